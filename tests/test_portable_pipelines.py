"""Every pipeline kind the scripts save loads with stock diffusers, without diffusers-curriculum installed.

One tiny run per kind, saved with ``--hub_model_id testuser/<kind>``; one subprocess in which the package cannot
be imported loads each folder with the README's stock call and samples 2 steps, then runs each model card's
loading snippet against a Hub cache holding the folders as ``testuser/<kind>`` (offline, the real Hub code path).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY_FLAGS, load_script
from portable_probe import REMOTE_CODE, load_stock, sample

PIXEL_FLAGS = [*TINY_FLAGS, "--max_train_steps", "2", "--max_train_samples", "64", "--no_validation"]
TDC_FLAGS = ["--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "1"]
SD_FLAGS = ["--dataset_name", "fashion_mnist", "--train_batch_size", "4", "--max_train_samples", "16", "--report_to", "none", "--seed", "0",
            "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--max_train_steps", "2",
            "--num_validation_inference_steps", "2"]
BASE_ID, BASE_LICENSE = "testuser/tiny-sd", "creativeml-openrail-m"
SDXL_BASE_ID, SDXL_LICENSE = "testuser/tiny-sdxl", "openrail++"
SD3_BASE_ID, SD3_LICENSE = "testuser/tiny-sd3", "other"
FLOW = ["--noise_process", "flow"]
COMPOSED = ["--timestep_sampling", "curriculum", "--balancer", "uw", "--clusters", "2", "--weighting", "learned"]
KINDS = {  # kind -> (script, flags)
    "unconditional_uniform": ("train_unconditional", PIXEL_FLAGS),
    "unconditional_curriculum": ("train_unconditional", [*PIXEL_FLAGS, "--regime", "curriculum", "--curriculum_clusters", "2"]),
    "unconditional_ant": ("train_unconditional", [*PIXEL_FLAGS, "--regime", "ant", "--ant_clusters", "2", "--use_ddim"]),
    "tdc": ("train_unconditional", [*PIXEL_FLAGS, *TDC_FLAGS]),
    "class_conditional": ("train_class_conditional", PIXEL_FLAGS),
    "class_conditional_tdc": ("train_class_conditional", [*PIXEL_FLAGS, *TDC_FLAGS]),
    "text_to_image": ("train_text_to_image", SD_FLAGS),
    "text_to_image_tdc": ("train_text_to_image", [*SD_FLAGS, *TDC_FLAGS]),
    "lora": ("train_text_to_image", [*SD_FLAGS, "--use_lora", "--rank", "2"]),
    "sdxl": ("train_text_to_image", [*SD_FLAGS, *COMPOSED]),
    "sdxl_lora": ("train_text_to_image", [*SD_FLAGS, *COMPOSED, "--use_lora", "--rank", "2"]),
    "sdxl_tdc": ("train_text_to_image", [*SD_FLAGS, *TDC_FLAGS, "--weighting", "p2"]),
    # SD3: a transformer trained by flow matching, three text encoders (the TDC run drops T5)
    "sd3": ("train_text_to_image", [*SD_FLAGS, *COMPOSED]),
    "sd3_lora": ("train_text_to_image", [*SD_FLAGS, *COMPOSED, "--use_lora", "--rank", "2"]),
    "sd3_tdc": ("train_text_to_image", [*SD_FLAGS, *TDC_FLAGS, "--weighting_scheme", "cosmap", "--drop_t5"]),
    # rectified flow: stock DDPMPipeline / the class-conditional pipeline with FlowMatchEulerDiscreteScheduler; the shifted
    # flow's experts route on real-valued boundaries
    "unconditional_flow": ("train_unconditional", [*PIXEL_FLAGS, *FLOW, "--weighting_scheme", "cosmap"]),
    "class_conditional_flow": ("train_class_conditional", [*PIXEL_FLAGS, *FLOW, "--class_dropout_prob", "0.1"]),
    "tdc_flow": ("train_unconditional", [*PIXEL_FLAGS, *TDC_FLAGS, *FLOW, "--flow_shift", "3"]),
}
PRUNED = {"tdc_pruned": "tdc", "tdc_flow_pruned": "tdc_flow"}  # pruned kind -> the kind it prunes
ALL_KINDS = [*KINDS, *PRUNED]
ROUTED = ("tdc", "tdc_pruned", "class_conditional_tdc", "text_to_image_tdc", "sdxl_tdc", "tdc_flow", "tdc_flow_pruned", "sd3_tdc")


def put_in_hub_cache(cache, repo_id, folder):
    """Lays ``folder`` out as huggingface_hub's cache holds a downloaded repo (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def card_snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every kind trained for a step or two and saved; the base Stable Diffusion sits in a Hub cache as testuser/tiny-sd."""
    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion, tiny_stable_diffusion_3, tiny_stable_diffusion_xl

    root = tmp_path_factory.mktemp("portable")
    cache = root / "hub-cache"
    bases = {}
    for name, build, repo_id, license in (("tiny-sd", tiny_stable_diffusion, BASE_ID, BASE_LICENSE),
                                          ("tiny-sdxl", tiny_stable_diffusion_xl, SDXL_BASE_ID, SDXL_LICENSE),
                                          ("tiny-sd3", tiny_stable_diffusion_3, SD3_BASE_ID, SD3_LICENSE)):
        build(root / f"build-{name}").save_pretrained(root / name)
        (root / name / "README.md").write_text(f"---\nlicense: {license}\nlibrary_name: diffusers\n---\n# {name}\n")
        bases[repo_id] = put_in_hub_cache(cache, repo_id, root / name)  # a snapshot path: the card must name its repo id
    folders = {}
    for kind, (name, flags) in KINDS.items():
        script = load_script(name)
        base_flags = ["--pretrained_model_name_or_path", str(bases[base_of(kind)])] if name == "train_text_to_image" else []
        out = root / kind
        script.main(script.parse_args(["--output_dir", str(out), *base_flags, *flags, "--hub_model_id", f"testuser/{kind}"]))
        folders[kind] = out
    prune = load_script("prune_experts")
    for kind, unpruned in PRUNED.items():
        folders[kind] = root / kind
        prune.main(prune.parse_args([
            "--pretrained_model_name_or_path", str(folders[unpruned]), "--output_dir", str(folders[kind]),
            "--prune_ratio", "0.5", "--search_rounds", "1", "--proxy_steps", "1", "--finetune_steps", "1",
            "--max_train_samples", "32", "--validation_size", "8", "--train_batch_size", "8", "--num_inference_steps", "4",
            "--hub_model_id", f"testuser/{kind}", "--max_loss_increase", "inf",  # prune whatever the quality gate says
        ]))
    for kind, folder in folders.items():
        put_in_hub_cache(cache, f"testuser/{kind}", folder)
    return {"root": root, "cache": cache, "folders": folders, "bases": bases}


def base_of(kind: str) -> str:
    return SDXL_BASE_ID if kind.startswith("sdxl") else SD3_BASE_ID if kind.startswith("sd3") else BASE_ID


@pytest.fixture(scope="module")
def without_package(saved):
    """The probe's report and sample arrays from a process in which diffusers_curriculum cannot be imported."""
    spec = {kind: {"folder": str(folder), "base": base_of(kind), "snippet": card_snippet((folder / "README.md").read_text())}
            for kind, folder in saved["folders"].items()}
    spec_path, out = saved["root"] / "spec.json", saved["root"] / "probe"
    spec_path.write_text(json.dumps(spec))
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(saved["cache"]), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "portable_probe.py"), str(spec_path), str(out)],
                          capture_output=True, text=True, env=env, cwd=saved["root"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_stock_diffusers_loads_each_kind_and_samples_exactly_as_with_the_package(saved, without_package, kind):
    report, out = without_package
    assert report["package_modules"] == []  # nothing of the package ran in the probe
    pipeline = load_stock(kind, saved["folders"][kind], saved["bases"][base_of(kind)])  # this process has the package imported
    expected = sample(kind, pipeline)
    assert np.array_equal(np.load(out / f"{kind}.npy"), expected)
    pipeline_class, unet_class, unet_module = report["types"][kind]
    if kind in ROUTED:
        assert unet_class == "TimestepRoutedExperts" and unet_module.startswith("diffusers_modules.")
    if "flow" in kind:
        assert report["schedulers"][kind] == "FlowMatchEulerDiscreteScheduler"
    if kind.startswith("class_conditional"):
        assert pipeline_class == "ClassConditionalPipeline"
    if kind.startswith("sdxl"):
        assert pipeline_class == "StableDiffusionXLPipeline"
        assert unet_class == ("TimestepRoutedExperts" if kind == "sdxl_tdc" else "UNet2DConditionModel")
    if kind.startswith("sd3"):
        assert pipeline_class == "StableDiffusion3Pipeline" and report["schedulers"][kind] == "FlowMatchEulerDiscreteScheduler"
        assert unet_class == ("TimestepRoutedExperts" if kind == "sd3_tdc" else "SD3Transformer2DModel")
        assert (pipeline.text_encoder_3 is None) == (kind == "sd3_tdc")  # --drop_t5 ships without T5
    if kind == "tdc_flow":  # shift 3 moves the log-SNR cut off the grid: the routing boundary is a real timestep
        level = json.loads((saved["folders"][kind] / "training_regime.json").read_text())["clusters"][0][1] / 100  # T = 100
        middle = pipeline.unet.config.boundaries[1]
        assert isinstance(middle, float) and middle == pytest.approx(100 * 3 * level / (1 + 2 * level))
    if kind in PRUNED:  # the pruned widths were rebuilt from the folder
        unpruned = load_stock(PRUNED[kind], saved["folders"][PRUNED[kind]]).unet
        assert sum(p.numel() for p in pipeline.unet.parameters()) < sum(p.numel() for p in unpruned.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_model_card_snippet_runs_without_the_package_and_metadata_follows_hub_conventions(saved, without_package, kind):
    report, _ = without_package
    assert report["snippets"][kind] == "ok"
    card = (saved["folders"][kind] / "README.md").read_text()
    snippet, meta = card_snippet(card), card_metadata(card)
    assert f'"testuser/{kind}"' in snippet
    assert ("trust_remote_code=True" in snippet) == (kind in REMOTE_CODE)
    assert "diffusers_curriculum" not in snippet and "pip install" not in card and "github.com" not in card
    assert meta["library_name"] == "diffusers"
    assert {"diffusers", "diffusers-training", "diffusers-curriculum"} <= set(meta["tags"])
    regime = ("tdc" if "tdc" in kind else "uniform" if "flow" in kind else kind.rsplit("_", 1)[-1] if kind.startswith("unconditional")
              else "curriculum+uw" if kind in ("sdxl", "sdxl_lora", "sd3", "sd3_lora") else "uniform")
    assert regime in meta["tags"]
    if kind.startswith(("text_to_image", "lora", "sdxl", "sd3")):
        assert meta["pipeline_tag"] == "text-to-image"
        license = SDXL_LICENSE if kind.startswith("sdxl") else SD3_LICENSE if kind.startswith("sd3") else BASE_LICENSE
        assert meta["base_model"] == base_of(kind) and meta["license"] == license
        assert ("Stable Diffusion XL (`StableDiffusionXLPipeline`)" in card) == kind.startswith("sdxl")
        assert ("Stable Diffusion 3 (`StableDiffusion3Pipeline`)" in card) == kind.startswith("sd3")
        assert ("max_sequence_length=77" in snippet) == kind.startswith("sd3")  # samples with the T5 length it trained at
        assert ("text_encoder_3=None, tokenizer_3=None" in snippet) == (kind == "sd3_tdc")  # --drop_t5
        if kind == "sd3_tdc":
            assert "`transformer/timestep_routed_experts.py`" in card
        assert "| resolution | `16` |" in card
    else:
        assert meta.get("pipeline_tag") == (None if kind.startswith("class_conditional") else "unconditional-image-generation")
        assert "license" not in meta  # trained from scratch: the weights are the user's to license
        assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]


def test_a_pushed_card_names_the_namespaced_repo_the_hub_created(tmp_path, monkeypatch):
    from diffusers_curriculum import hub

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    uploaded = {}

    class Repo:
        repo_id = "someone/run"

    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(hub, "upload_folder", lambda repo_id, folder_path, **kwargs: uploaded.update(
        repo_id=repo_id, card=(tmp_path / "README.md").read_text()))

    def write_card(repo_id):
        hub.write_model_card(str(tmp_path), "unconditional", repo_id, {"name": "uniform"}, {}, "DDPMPipeline",
                             num_inference_steps=50)

    assert hub.publish(str(tmp_path), write_card, push_to_hub=True, hub_model_id="run", token="hf_x") == "someone/run"
    assert uploaded["repo_id"] == "someone/run"
    assert 'DiffusionPipeline.from_pretrained("someone/run")' in uploaded["card"]
    # without a push the card names --hub_model_id, or the folder's name
    assert hub.publish(str(tmp_path), write_card, push_to_hub=False) == tmp_path.name


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: "org/model", "org/model"),
    (lambda tmp: tmp / "hub" / "models--org--model" / "snapshots" / "abc123", "org/model"),
    (lambda tmp: tmp / "clone", "org/cloned"),
    (lambda tmp: tmp / "plain", None),
], ids=["hub-id", "hub-cache-snapshot", "git-clone", "unknown-folder"])
def test_base_model_id_of_local_folders_that_came_from_the_hub(tmp_path, make, expected):
    from diffusers_curriculum.hub import base_model_id

    (tmp_path / "hub" / "models--org--model" / "snapshots" / "abc123").mkdir(parents=True)
    (tmp_path / "clone" / ".git").mkdir(parents=True)
    (tmp_path / "clone" / ".git" / "config").write_text('[remote "origin"]\n\turl = https://huggingface.co/org/cloned\n')
    (tmp_path / "plain").mkdir()
    assert base_model_id(str(make(tmp_path))) == expected


def test_base_model_license_comes_from_the_base_card_or_is_absent(tmp_path):
    from diffusers_curriculum.hub import base_model_license

    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert base_model_license(str(tmp_path), None) == "mit"
    # a Hub id whose card cannot be fetched (offline in tests, nothing cached): no license, no error
    assert base_model_license(str(tmp_path / "absent"), "nobody/none") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tdc_pruned", "class_conditional_tdc", "text_to_image_tdc"])
def test_an_online_hub_download_fetches_everything_the_custom_code_needs(saved, tmp_path, monkeypatch, kind):
    """diffusers' online path (repo listing -> allow patterns -> snapshot_download), served from the saved folder:
    what its patterns select is copied to a fresh folder, which must load and sample like the original."""
    from types import SimpleNamespace

    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import dynamic_modules_utils
    from huggingface_hub.utils import filter_repo_objects

    folder, repo_id = saved["folders"][kind], f"testuser/{kind}"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files], sha="0" * 40)
    fetched = tmp_path / "fetched"

    def hf_hub_download(repo, filename, subfolder=None, **kwargs):
        assert repo == repo_id
        path = f"{subfolder}/{filename}" if subfolder else filename
        if path == "model_index.json":  # alone in the "cache", so that diffusers goes on to snapshot_download
            (tmp_path / "index").mkdir(exist_ok=True)
            return shutil.copyfile(folder / path, tmp_path / "index" / path)
        return str(folder / path)

    def snapshot_download(repo, allow_patterns=None, ignore_patterns=None, **kwargs):
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (fetched / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, fetched / name)
        return str(fetched)

    for module in (pipeline_utils, dynamic_modules_utils):
        monkeypatch.setattr(module, "model_info", lambda *args, **kwargs: info, raising=False)
        monkeypatch.setattr(module, "hf_hub_download", hf_hub_download, raising=False)
    monkeypatch.setattr(pipeline_utils, "snapshot_download", snapshot_download)

    assert DiffusionPipeline.download(repo_id, trust_remote_code=True, local_files_only=False) == str(fetched)
    loaded = load_stock(kind, str(fetched))
    assert np.array_equal(sample(kind, loaded), sample(kind, load_stock(kind, str(folder))))

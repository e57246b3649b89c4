"""A tiny random Stable Diffusion, SDXL or SD3 (denoiser, AutoencoderKL, text encoders and tokenizers built
locally) for offline tests and examples. Nothing here touches the Hub.

    python -m diffusers_curriculum.tiny_sd --output_dir tiny-sd                 # then --pretrained_model_name_or_path tiny-sd
    python -m diffusers_curriculum.tiny_sd --output_dir tiny-sdxl --family sdxl
    python -m diffusers_curriculum.tiny_sd --output_dir tiny-sd3 --family sd3

Its VAE halves the resolution once and its UNet works on 8×8 latents: 16×16 images, 16-token prompts. The SDXL
one has SDXL's conditioning: two text encoders (the second with a projection), their penultimate hidden states side
by side as cross-attention context, the pooled projection and six size/crop ids as ``text_time`` embeddings. The SD3
one is SD3's layout: an ``SD3Transformer2DModel`` (2×2 patches), two CLIP encoders with projections and a T5 encoder
(a character-level T5 tokenizer), a VAE with a shift factor and a ``FlowMatchEulerDiscreteScheduler`` (shift 3).
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4,
)


def bytes_to_unicode():
    """GPT-2/CLIP's byte → printable-character table (a byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (byte alphabet, no merges) written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


# SDXL: cross-attention over both encoders' hidden states (12 + 12), `text_time` added embeddings of the pooled
# projection (12) and the six size/crop ids (6 × 4).
SDXL_UNET_CONFIG = dict(UNET_CONFIG, cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=4,
                        projection_class_embeddings_input_dim=12 + 6 * 4, use_linear_projection=True)


def tiny_text_config(tokenizer: CLIPTokenizer, **changes) -> CLIPTextConfig:
    vocab = tokenizer.get_vocab()
    config = dict(vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                  pad_token_id=vocab["<|endoftext|>"])
    return CLIPTextConfig(**{**config, **changes})


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16)


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)


def tiny_stable_diffusion(folder: Path, unet=None, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet or UNet2DConditionModel(**UNET_CONFIG),
        scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_stable_diffusion_xl(folder: Path, seed: int = 0):
    """SDXL's conditioning at the tiny SD's size (two-layer encoders, so the penultimate hidden state is a layer's)."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, num_hidden_layers=2))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, num_hidden_layers=2, projection_dim=12))
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), scheduler=tiny_scheduler(), add_watermarker=False,
    )


def tiny_t5_tokenizer(max_length: int = 32):
    """A character-level T5 tokenizer (a unigram model over printable ASCII, SentencePiece's ``▁`` word marker,
    ``</s>`` appended) built with ``tokenizers``: no SentencePiece model file needed."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁", *string.ascii_letters, *string.digits, *string.punctuation]
    tokenizer = Tokenizer(models.Unigram([(piece, 0.0) for piece in pieces], unk_id=2))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length)


# SD3: CLIP hidden states (12 + 12, zero-padded to T5's 32) and T5's (32) as the joint context; pooled: 12 + 12.
SD3_TRANSFORMER_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=24, pos_embed_max_size=32)  # up to 128 px


def tiny_stable_diffusion_3(folder: Path, seed: int = 0):
    """SD3's components at the tiny SD's size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    encoders = [CLIPTextModelWithProjection(tiny_text_config(tokenizer, num_hidden_layers=2, projection_dim=12)) for _ in range(2)]
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                             relative_attention_num_buckets=8, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


FAMILIES = {"sd": tiny_stable_diffusion, "sdxl": tiny_stable_diffusion_xl, "sd3": tiny_stable_diffusion_3}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a tiny random Stable Diffusion pipeline to a folder.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", type=str, default="sd", choices=sorted(FAMILIES), help="Stable Diffusion 1.x-style, SDXL or SD3.")
    write_tiny(**vars(parser.parse_args(argv)))


def write_tiny(output_dir: str, family: str = "sd", seed: int = 0):
    """Saves the tiny random pipeline of ``family`` to ``output_dir``; returns it."""
    import shutil

    folder = Path(output_dir)
    pipeline = FAMILIES[family](folder / ".build", seed=seed)
    pipeline.save_pretrained(folder)
    shutil.rmtree(folder / ".build", ignore_errors=True)
    print(f"Saved a tiny {type(pipeline).__name__} to {folder}")
    return pipeline


if __name__ == "__main__":
    main()

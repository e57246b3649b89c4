import pytest
import torch

from diffusers_curriculum import metrics
from diffusers_curriculum.metrics import (
    classifier_accuracy, fashion_feature_extractor, fashion_mnist_unit, feature_fid, train_feature_extractor,
)


@pytest.fixture(scope="module")
def data():
    train_x, train_y = fashion_mnist_unit("train")
    test_x, test_y = fashion_mnist_unit("test")
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def extractor(data):
    train_x, train_y, _, _ = data
    return train_feature_extractor(train_x[:6000], train_y[:6000], epochs=1, seed=0)  # small and quick for tests


def test_extractor_learns_the_classes(extractor, data):
    _, _, test_x, test_y = data
    assert classifier_accuracy(extractor, test_x[:2000], test_y[:2000]) > 0.7


def test_fid_of_real_vs_held_out_real_is_small_and_real_vs_noise_large(extractor, data):
    train_x, _, test_x, _ = data
    floor = feature_fid(train_x[:1000], test_x[:1000], extractor)
    noise = feature_fid(train_x[:1000], torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)), extractor)
    blurred = feature_fid(train_x[:1000], torch.nn.functional.avg_pool2d(test_x[:1000], 3, 1, 1), extractor)
    assert 0 <= floor < 0.05 * noise and floor < blurred < noise


def test_fid_is_symmetric_and_deterministic(extractor, data):
    train_x, _, test_x, _ = data
    a, b = train_x[:600], test_x[:600]
    first = feature_fid(a, b, extractor)
    assert feature_fid(a, b, extractor) == first
    assert feature_fid(b, a, extractor) == pytest.approx(first, rel=1e-3)


def test_extractor_is_trained_once_then_loaded_from_cache(tmp_path, monkeypatch, data):
    train_x, train_y, test_x, _ = data
    monkeypatch.setattr(metrics, "fashion_mnist_unit", lambda split: (train_x[:512], train_y[:512]))
    first = fashion_feature_extractor(tmp_path, seed=3, epochs=1)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["fashion_features_seed3_epochs1.safetensors"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(metrics, "train_feature_extractor", no_training)
    second = fashion_feature_extractor(tmp_path, seed=3, epochs=1)
    with torch.no_grad():
        assert torch.equal(first(test_x[:8]), second(test_x[:8]))


def test_extractor_accepts_rgb_and_other_sizes(extractor, data):
    _, _, test_x, _ = data
    grey32 = torch.nn.functional.interpolate(test_x[:4], size=32, mode="bilinear")
    with torch.no_grad():
        assert extractor(grey32).shape == (4, 128)
        assert torch.allclose(extractor(grey32.repeat(1, 3, 1, 1)), extractor(grey32), atol=1e-6)


def test_inception_fid_needs_local_weights(tmp_path):
    images = torch.rand(4, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match="Inception weights .* do not exist"):
        metrics.inception_fid(images, images, str(tmp_path / "pt_inception.pth"))


def test_class_agreement_of_real_images_is_high_and_of_wrong_requests_low(extractor, data):
    _, _, test_x, test_y = data
    images, labels = test_x[:1000], test_y[:1000]
    right = metrics.class_agreement(extractor, images, labels)
    assert right["mean"] > 0.7 and len(right["per_class"]) == 10 and all(0 <= s <= 1 for s in right["per_class"])
    wrong = metrics.class_agreement(extractor, images, (labels + 1) % 10)
    assert wrong["mean"] < 0.2
    only_sneakers = labels == 7
    partial = metrics.class_agreement(extractor, images[only_sneakers], labels[only_sneakers])
    assert partial["per_class"][7] == partial["mean"] and partial["per_class"][0] is None

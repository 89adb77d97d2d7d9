"""Classifier contract: shapes, features, hidden representations, resizing, metadata, pretrained weights."""

import urllib.error

import pytest
import torch
import torch.nn.functional as F

from diffmi_ray.errors import UserError
from diffmi_ray.models import create, get_info, names
from diffmi_ray.models.classifiers import Classifier

# (name, constructor kwargs, input size): small geometries so each case runs in about a second on CPU
CASES = [
    ("small_cnn", {"in_channels": 1}, 28),
    ("small_cnn", {"width": 8, "feature_dim": 24}, 32),
    ("small_resnet", {"in_channels": 1}, 28),
    ("small_resnet", {"width": 8, "depth": 1}, 32),
    ("resnet18", {}, 32),
    ("resnet34", {"in_channels": 1}, 32),
    ("vgg16", {"image_size": 32}, 32),
    ("facenet64", {"image_size": 16}, 16),
    ("ir152", {"image_size": 16}, 16),
]
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name, kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = create(name, NUM_CLASSES, **kw)
        return cache[key]

    return get


@pytest.mark.parametrize("name,kw,size", CASES, ids=[f"{n}-{s}-{i}" for i, (n, _, s) in enumerate(CASES)])
def test_contract(built, name, kw, size):
    net = built(name, kw).eval()
    assert isinstance(net, Classifier)
    c = kw.get("in_channels", 3)
    assert net.in_channels == c and net.num_classes == NUM_CLASSES
    x = torch.rand(2, c, size, size, generator=torch.Generator().manual_seed(1))  # [0, 1] images
    with torch.no_grad():  # three passes only: the IR-152 case is memory-bound on CPU
        logits = net(x)
        feats, l2 = net.features_and_logits(x)
        hidden, l3 = net.forward_with_hidden(x)
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    assert feats.shape == (2, net.feature_dim)
    torch.testing.assert_close(net.logits_from_features(feats), logits)
    torch.testing.assert_close(l2, logits)
    torch.testing.assert_close(l3, logits)
    assert len(hidden) >= 3
    assert all(h.dim() == 2 and h.shape[0] == 2 for h in hidden)
    torch.testing.assert_close(hidden[-1], feats)
    if sum(p.numel() for p in net.parameters()) < 2_000_000:  # the small models: every entry point
        with torch.no_grad():
            torch.testing.assert_close(net.features(x), feats)
            assert len(net.hidden_features(x)) == len(hidden)
            f4, l4 = net(x, return_features=True)
            h5, l5 = net(x, return_hidden=True)
        torch.testing.assert_close(f4, feats)
        torch.testing.assert_close(l4, logits)
        torch.testing.assert_close(h5[-1], feats)
        torch.testing.assert_close(l5, logits)
        with pytest.raises(ValueError, match="not both"):
            net(x, return_features=True, return_hidden=True)


@pytest.mark.parametrize("name,kw,size", CASES[:5] + CASES[6:7])
def test_gradients_reach_the_input(built, name, kw, size):
    net = built(name, kw).train()
    x = torch.rand(2, kw.get("in_channels", 3), size, size, requires_grad=True)
    hidden, logits = net.forward_with_hidden(x)
    (logits.sum() + sum(h.mean() for h in hidden)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)


def test_feature_dims():
    assert create("vgg16", 3).feature_dim == 2048  # 512 * 2 * 2 at 64 px
    assert create("small_cnn", 3, width=8).feature_dim == 32
    assert create("small_resnet", 3, width=8).feature_dim == 32
    with torch.device("meta"):
        assert create("facenet64", 3).feature_dim == 512
        assert create("resnet18", 3).feature_dim == 512


def test_vgg16_bn_bias_frozen_like_the_community_model():
    net = create("vgg16", 3, image_size=32)
    assert net.bn.bias.requires_grad is False
    assert "bn.bias" in net.state_dict()


def test_torchvision_key_names_kept():
    import torchvision

    with torch.device("meta"):
        ours = create("resnet18", 7)
        ref = torchvision.models.resnet18(weights=None, num_classes=7)
    assert list(ours.state_dict()) == list(ref.state_dict())


def _input_hook(module, store):
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


def test_facenet_eval_resizes_to_112():
    torch.manual_seed(0)
    net = create("facenet_eval", NUM_CLASSES).eval()
    seen = []
    handle = _input_hook(net.feature.input_layer, seen)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats, logits = net.features_and_logits(x)
    handle.remove()
    assert seen[0].shape == (1, 3, 112, 112)
    torch.testing.assert_close(seen[0], F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False))
    assert feats.shape == (1, 512) and logits.shape == (1, NUM_CLASSES)


def test_inception_v3_eval_resizes_to_299():
    torch.manual_seed(0)
    net = create("inception_v3_eval", NUM_CLASSES).eval()
    seen = []
    handle = _input_hook(net.Conv2d_1a_3x3, seen)
    with torch.no_grad():
        hidden, logits = net.forward_with_hidden(torch.rand(1, 3, 32, 32))
    handle.remove()
    assert seen[0].shape == (1, 3, 299, 299)
    assert logits.shape == (1, NUM_CLASSES) and hidden[-1].shape == (1, 2048)
    assert "AuxLogits.fc.weight" not in net.state_dict()


def test_wrong_inputs_are_rejected(built):
    net = built("vgg16", {"image_size": 32}).eval()
    with pytest.raises(ValueError, match="built for 32x32"):
        net(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="3 input channel"):
        net(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        create("vgg16", 3, image_size=48)
    with pytest.raises(ValueError, match="multiple of 16"):
        create("facenet64", 3, image_size=40)


def test_registry_metadata():
    expected = {"vgg16", "ir152", "facenet64", "facenet_eval", "kedmi_vgg16", "kedmi_ir152", "kedmi_facenet64",
                "kedmi_facenet_eval", "resnet18", "resnet34", "inception_v3_eval", "small_cnn", "small_resnet"}
    assert expected <= set(names("classifier"))
    for n in expected:
        info = get_info(n)
        assert info.kind == "classifier"
        assert info.extra["data_kwargs"] == ("in_channels", "image_size")
    assert get_info("kedmi_vgg16").factory is get_info("vgg16").factory
    assert get_info("kedmi_facenet_eval").factory is get_info("facenet_eval").factory
    assert get_info("vgg16").size_error(64, 3) is None
    assert get_info("vgg16").size_error(32, 1) is None
    assert "image sizes" in get_info("vgg16").size_error(48, 3)
    assert get_info("kedmi_vgg16").size_error(64, 3) is None
    assert "image sizes [64]" in get_info("kedmi_vgg16").size_error(32, 3)
    assert "input channel" in get_info("kedmi_ir152").size_error(64, 1)
    assert get_info("facenet_eval").size_error(64, 3) is None
    assert get_info("small_cnn").size_error(28, 1) is None
    assert ">= 8" in get_info("small_cnn").size_error(4, 1)
    assert ">= 32" in get_info("resnet18").size_error(16, 3)


# --- pretrained weights -------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    def fail(url, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)


@pytest.mark.parametrize("name,kw,weights", [
    ("resnet18", {}, "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet34", {}, "ResNet34_Weights.IMAGENET1K_V1"),
    ("vgg16", {"image_size": 32}, "VGG16_BN_Weights.IMAGENET1K_V1"),
    ("inception_v3_eval", {}, "Inception_V3_Weights.IMAGENET1K_V1"),
])
def test_pretrained_offline_raises_user_error(offline, name, kw, weights):
    with pytest.raises(UserError) as ei:
        create(name, NUM_CLASSES, pretrained=True, **kw)
    msg = str(ei.value)
    assert weights in msg and "TORCH_HOME" in msg and "hub" in msg and ".pth" in msg
    assert "URLError" in msg and "pretrained=False" in msg


@pytest.mark.parametrize("name", ["small_cnn", "small_resnet", "facenet64", "facenet_eval"])
def test_pretrained_unavailable_models_refuse(name):
    with torch.device("meta"), pytest.raises(UserError, match="no downloadable pretrained weights"):
        create(name, NUM_CLASSES, pretrained=True)


def test_pretrained_weights_are_loaded_and_adapted(monkeypatch):
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.resnet18(weights=None).state_dict()  # stands in for the ImageNet file
    urls = []

    def fake(url, *a, **k):
        urls.append(url)
        return {k: v.clone() for k, v in src.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    net = create("resnet18", NUM_CLASSES, pretrained=True, in_channels=1)
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    sd = net.state_dict()
    torch.testing.assert_close(sd["layer3.0.conv1.weight"], src["layer3.0.conv1.weight"])
    torch.testing.assert_close(sd["conv1.weight"], src["conv1.weight"].sum(1, keepdim=True))  # gray = sum of RGB
    assert sd["fc.weight"].shape == (NUM_CLASSES, 512)  # new head, random init

    vgg_src = {"features." + k[len("feature."):]: v + 1.0 for k, v in create("vgg16", 2, image_size=32)
               .state_dict().items() if k.startswith("feature.")}
    vgg_src["classifier.0.weight"] = torch.zeros(4, 4)  # ImageNet head: ignored
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, *a, **k: vgg_src)
    vgg = create("vgg16", NUM_CLASSES, pretrained=True, image_size=32)
    torch.testing.assert_close(vgg.state_dict()["feature.40.weight"], vgg_src["features.40.weight"])

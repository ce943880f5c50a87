"""kd.models: the timm factory, small-input stems, maps, adapter and checkpoint loading (CPU, tiny inputs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm/huggingface_hub read it: never touch the network

import pytest
import timm
import torch
from torch import nn

from kd.errors import CheckpointError, ConfigError
from kd.io import atomic_torch_save
from kd.models import KDModel, ModelOutput, check_meta, create_model, load_model_weights, model_checkpoint

NUM_CLASSES = 10

# name -> extra create_model kwargs; patch-embedding models need their image size at creation
FAMILIES = {
    "resnet18": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "swin_tiny_patch4_window7_224": {"img_size": 32},
    "vit_tiny_patch16_224": {"img_size": 32},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _make(name: str, **kwargs) -> KDModel:
    torch.manual_seed(0)
    return create_model(name, NUM_CLASSES, **kwargs).eval()


def _check_output(model: KDModel, x: torch.Tensor) -> ModelOutput:
    """Shapes of feature/logits/maps, map sizes vs feature_info, and logits == the timm forward."""
    with torch.no_grad():
        out = model(x, with_maps=True)
        plain = model(x)
        reference = model.backbone(x)
    b, size = x.shape[0], x.shape[-1]
    assert out.feature.shape == (b, model.num_features)
    assert out.logits.shape == (b, NUM_CLASSES)
    assert plain.maps is None
    assert len(out.maps) == len(model.backbone.feature_info)
    assert [m.shape[1] for m in out.maps] == model.feature_channels()
    for m, reduction in zip(out.maps, model.feature_reductions()):
        assert m.dim() == 4 and m.shape[0] == b
        assert m.shape[-2:] == (size // reduction, size // reduction)
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain.logits, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain.feature, out.feature, rtol=0, atol=1e-5)
    return out


@pytest.mark.parametrize("small_input", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_at_32px(name: str, small_input: bool) -> None:
    model = _make(name, small_input=small_input, **FAMILIES[name])
    assert model.meta() == {
        "arch": name,
        "num_classes": NUM_CLASSES,
        "num_features": model.num_features,
        "small_input": small_input,
        "adapter_dim": 0,
    }
    out = _check_output(model, _batch(32))
    if small_input:  # the final map keeps spatial structure at 32 px
        assert min(out.maps[-1].shape[-2:]) >= 2


def test_num_features_is_the_pooled_width() -> None:
    assert _make("resnet18").num_features == 512
    assert _make("convnext_atto").num_features == 320
    assert _make("efficientnet_b0").num_features == 1280
    # MobileNetV3's pre-logits conv lifts 288 channels to 1024: the pooled feature is 1024 wide
    model = _make("mobilenetv3_small_050")
    assert model.num_features == 1024
    _check_output(model, _batch(32))


def test_resnet_small_stem_at_32_and_64px() -> None:
    model = _make("resnet18", small_input=True)
    conv = model.backbone.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert model.feature_reductions() == [1, 1, 2, 4, 8]
    out = _check_output(model, _batch(64))
    assert out.maps[-1].shape[-2:] == (8, 8)
    assert _check_output(model, _batch(32)).maps[-1].shape[-2:] == (4, 4)


def test_small_stem_keeps_3x3_weights_and_shrinks_patchify() -> None:
    plain, small = _make("efficientnet_b0"), _make("efficientnet_b0", small_input=True)
    assert small.backbone.conv_stem.stride == (1, 1)
    torch.testing.assert_close(small.backbone.conv_stem.weight, plain.backbone.conv_stem.weight)
    convnext = _make("convnext_atto", small_input=True)
    assert convnext.backbone.stem[0].kernel_size == (3, 3) and convnext.backbone.stem[0].stride == (1, 1)
    assert convnext.feature_reductions() == [1, 2, 4, 8]
    # RegNet's first feature stage `stem` contains the stem conv: its reduction drops too
    regnet = _make("regnety_002", small_input=True)
    assert regnet.feature_reductions() == [1, 2, 4, 8, 16]
    _check_output(regnet, _batch(32))


def test_small_input_is_a_no_op_for_models_built_for_32px() -> None:
    name = "cifar_resnet8x4"  # registered by kd.zoo
    if not timm.is_model(name):
        pytest.skip("kd.zoo does not register cifar_resnet8x4")
    plain, small = _make(name), _make(name, small_input=True)
    assert small.feature_reductions() == plain.feature_reductions()
    torch.testing.assert_close(small.state_dict(), plain.state_dict())
    _check_output(small, _batch(32))


def test_small_input_transformers_use_smaller_patches() -> None:
    vit = _make("vit_tiny_patch16_224", small_input=True)
    assert vit.backbone.patch_embed.patch_size == (4, 4)
    assert vit.feature_reductions()[-1] == 4
    swin = _make("swin_tiny_patch4_window7_224", small_input=True)
    assert swin.feature_reductions() == [2, 4, 8, 16]
    # img_size is honoured at 64 px too
    out = _check_output(_make("vit_tiny_patch16_224", small_input=True, img_size=64), _batch(64))
    assert out.maps[-1].shape[-2:] == (16, 16)


def test_adapter_is_identity_at_init_and_trainable() -> None:
    torch.manual_seed(0)
    base = create_model("resnet18", NUM_CLASSES).eval()
    torch.manual_seed(0)
    adapted = create_model("resnet18", NUM_CLASSES, adapter_dim=16).eval()
    assert adapted.adapter is not None and adapted.adapter.down.out_features == 16
    assert adapted.meta()["adapter_dim"] == 16
    x = _batch(32)
    adapted.load_state_dict(base.state_dict(), strict=False)  # same backbone weights
    with torch.no_grad():
        a, b = adapted(x), base(x)
    torch.testing.assert_close(a.feature, b.feature, rtol=0, atol=0)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    adapted(x).logits.sum().backward()
    assert adapted.adapter.up.weight.grad.abs().sum() > 0


def test_classifier_is_the_timm_head_stored_once() -> None:
    model = _make("resnet18")
    assert model.classifier is model.backbone.fc
    assert all(k.startswith("backbone.") for k in model.state_dict())


def test_checkpoint_round_trip_all_layouts(tmp_path) -> None:
    source = _make("convnext_atto", small_input=True, adapter_dim=8)
    with torch.no_grad():
        source.adapter.up.weight.normal_()  # make the adapter matter
        expected = source(_batch(32)).logits
    ckpt = model_checkpoint(source)
    layouts = {
        "kd.pt": ckpt,
        "train.pt": {"student": ckpt, "epoch": 3, "teachers": {}},
        "raw.pt": ckpt["model"],
    }
    for filename, obj in layouts.items():
        atomic_torch_save(obj, tmp_path / filename)
        torch.manual_seed(1)  # different init: equality below comes from the checkpoint
        loaded = create_model(
            "convnext_atto", NUM_CLASSES, small_input=True, adapter_dim=8, checkpoint=str(tmp_path / filename)
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(_batch(32)).logits, expected, rtol=0, atol=0)
    assert load_model_weights(loaded, str(tmp_path / "kd.pt")) == source.meta()
    assert load_model_weights(loaded, str(tmp_path / "raw.pt")) == {}


def test_plain_timm_state_dict_loads(tmp_path) -> None:
    source = _make("resnet18")
    atomic_torch_save(source.backbone.state_dict(), tmp_path / "timm.pt")
    loaded = create_model("resnet18", NUM_CLASSES, checkpoint=str(tmp_path / "timm.pt"))
    torch.testing.assert_close(loaded.backbone.fc.weight, source.backbone.fc.weight)


def test_class_count_mismatch_names_model_and_counts(tmp_path) -> None:
    path = tmp_path / "t.pt"
    atomic_torch_save(model_checkpoint(create_model("resnet18", 200)), path)
    with pytest.raises(CheckpointError) as err:
        create_model("resnet18", NUM_CLASSES, checkpoint=str(path))
    assert str(err.value) == f"checkpoint {path}: resnet18 expects 10 classes, checkpoint has 200"


def test_small_input_arch_and_adapter_mismatch(tmp_path) -> None:
    path = tmp_path / "t.pt"
    atomic_torch_save(model_checkpoint(create_model("resnet18", NUM_CLASSES, small_input=True)), path)
    with pytest.raises(CheckpointError, match="resnet18 expects small_input=False, checkpoint has small_input=True"):
        create_model("resnet18", NUM_CLASSES, checkpoint=str(path))
    with pytest.raises(CheckpointError, match="model is resnet34, checkpoint is for resnet18"):
        create_model("resnet34", NUM_CLASSES, small_input=True, checkpoint=str(path))
    with pytest.raises(CheckpointError, match="expects adapter_dim=4, checkpoint has adapter_dim=0"):
        create_model("resnet18", NUM_CLASSES, small_input=True, adapter_dim=4, checkpoint=str(path))


def test_state_dict_mismatch_is_one_line(tmp_path) -> None:
    model = _make("resnet18")
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if "fc" not in k}
    atomic_torch_save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"2 missing, e\.g\. \['backbone\.fc\.weight'") as err:
        load_model_weights(model, str(tmp_path / "missing.pt"))
    assert "\n" not in str(err.value)
    wrong_shape = dict(state, **{"backbone.fc.bias": torch.zeros(3)})
    atomic_torch_save(wrong_shape, tmp_path / "shape.pt")
    shape_message = r"backbone\.fc\.bias has shape \(3,\) in checkpoint, resnet18 expects \(10,\)"
    with pytest.raises(CheckpointError, match=shape_message):
        load_model_weights(model, str(tmp_path / "shape.pt"))


def test_corrupt_and_missing_checkpoint(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        create_model("resnet18", NUM_CLASSES, checkpoint=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        create_model("resnet18", NUM_CLASSES, checkpoint=str(tmp_path / "absent.pt"))
    atomic_torch_save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        create_model("resnet18", NUM_CLASSES, checkpoint=str(tmp_path / "list.pt"))


def test_check_meta_reports_first_mismatch() -> None:
    expected = {"arch": "a", "num_classes": 3, "small_input": True}
    check_meta(expected, dict(expected, extra=1), "x")
    with pytest.raises(CheckpointError, match="^x: a expects 3 classes, checkpoint has 4$"):
        check_meta(expected, {"arch": "a", "num_classes": 4, "small_input": False}, "x")
    with pytest.raises(CheckpointError, match="small_input=True, checkpoint has small_input=<missing>"):
        check_meta(expected, {"arch": "a", "num_classes": 3}, "x")


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError, match=r"^unknown model 'resnet1'; close names: ([a-z0-9_]+, )*resnet18, "):
        create_model("resnet1", NUM_CLASSES)
    with pytest.raises(ConfigError, match=r"^unknown model 'resnt18'; close names: resnet18"):
        create_model("resnt18", NUM_CLASSES)
    with pytest.raises(ConfigError, match=r"^unknown model 'qqqqqqqq'; see timm.list_models\(\)$"):
        create_model("qqqqqqqq", NUM_CLASSES)


def test_bad_numbers_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet18", 0)
    with pytest.raises(ConfigError, match="adapter_dim"):
        create_model("resnet18", NUM_CLASSES, adapter_dim=-1)


def test_pretrained_offline_is_a_config_error(tmp_path, monkeypatch) -> None:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", NUM_CLASSES, pretrained=True)
    message = str(err.value)
    assert message.startswith("could not load pretrained weights for resnet18: ")
    assert message.endswith("; run online once to cache them, or pass a local checkpoint")
    assert "\n" not in message

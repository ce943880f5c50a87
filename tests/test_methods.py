"""Baseline methods (kd/methods/*): named terms, gradients, auxiliary modules, schedules, CRD state,
logit standardisation, and one short train.py run per method."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kd.errors import ConfigError
from kd.losses import at_loss, dist_loss, dkd_loss, kd_loss, pkt_loss, rkd_loss, sp_loss, standardize_logits
from kd.methods import METHOD_SPECS, method_class, method_names
from kd.methods.base import StepInputs
from kd.configs import CRDCfg, DKDCfg, KDCfg
from kd.methods.fitnet import hint_regressor
from kd.models import ModelOutput, create_model

import train

NUM_CLASSES, NUM_TRAIN, BATCH = 10, 40, 8
TRAIN_LABELS = torch.arange(NUM_TRAIN) % NUM_CLASSES
BASELINES = method_names("logit", "feature")  # the single-teacher baselines of the method table
TERMS = {
    "kd": "kd",
    "fitnet": "hint",
    "at": "at",
    "dkd": "dkd",
    "crd": "crd",
    "rkd": "rkd",
    "pkt": "pkt",
    "sp": "sp",
    "dist": "dist",
}
AUX = {"fitnet": {"regressor"}, "crd": {"embed_s", "embed_t"}}
# published CIFAR-100 defaults (DKD at epoch 1 of a 20-epoch warm-up)
WEIGHTS_EPOCH1 = {
    "kd": 0.9,
    "fitnet": 100.0,
    "at": 1000.0,
    "dkd": 0.05,
    "crd": 0.8,
    "rkd": 1.0,
    "pkt": 30000.0,
    "sp": 3000.0,
    "dist": 2.0,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    student = create_model("resnet8", NUM_CLASSES)
    teachers = [create_model(a, NUM_CLASSES).eval().requires_grad_(False) for a in ("resnet20", "wrn_16_2")]
    return student, teachers


def build(name, student, teachers, cfg=None, **kw):
    cls, cfg_cls = method_class(name), METHOD_SPECS[name].config
    kw = {"num_classes": NUM_CLASSES, "num_train": NUM_TRAIN, "image_size": 32, "train_labels": TRAIN_LABELS, **kw}
    return cls(cfg if cfg is not None else cfg_cls(), student, teachers, **kw)


def step_inputs(method, student, teachers, seed=0, index=None, epoch=1) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randperm(NUM_CLASSES, generator=g)[:BATCH]
    maps = method.needs_maps
    with torch.no_grad():
        t_outs = [t(x, with_maps=maps) for t in teachers]
    index = torch.arange(BATCH) if index is None else index
    return StepInputs(x=x, target=y, index=index, epoch=epoch, student=student(x, with_maps=maps), teachers=t_outs)


def nonzero_grad(loss, params) -> bool:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", BASELINES)
def test_terms_are_finite_with_gradients_and_aux_params_are_trained(nets, name):
    student, teachers = nets
    method = build(name, student, teachers[:1])
    terms = method(step_inputs(method, student, teachers[:1]))
    assert set(terms) == {"ce", TERMS[name]}
    assert set(method.loss_weights(1)) == set(terms)
    assert method.loss_weights(1)[TERMS[name]] == pytest.approx(WEIGHTS_EPOCH1[name])
    assert {n.split(".")[0] for n, _ in method.named_parameters()} == AUX.get(name, set())
    for key, value in terms.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert nonzero_grad(value, list(student.parameters())), key
    for module in AUX.get(name, ()):
        assert nonzero_grad(terms[TERMS[name]], list(getattr(method, module).parameters())), module


def test_feature_terms_use_the_documented_taps_and_the_first_teacher(nets):
    student, teachers = nets  # two teachers: feature methods read teachers[0] only
    expected = {
        "at": lambda s, t: at_loss(s.maps[-3:], t.maps[-3:]),
        "sp": lambda s, t: sp_loss(s.maps[-1:], t.maps[-1:]),
        "rkd": lambda s, t: rkd_loss(s.feature, t.feature, 25.0, 50.0),
        "pkt": lambda s, t: pkt_loss(s.feature, t.feature),
    }
    for name, loss in expected.items():
        method = build(name, student, teachers)
        inp = step_inputs(method, student, teachers)
        got = method(inp)[name]
        assert got.item() == pytest.approx(loss(inp.student, inp.teachers[0]).item(), rel=1e-6), name
        assert got.item() != pytest.approx(loss(inp.student, inp.teachers[1]).item(), rel=1e-3), name


def test_fitnet_regressor_maps_middle_stage_to_first_teacher(nets):
    student, teachers = nets
    method = build("fitnet", student, teachers[::-1])  # wrn_16_2 first: middle map [64, 16, 16]
    inp = step_inputs(method, student, teachers[::-1])
    assert method.student_index == 2 and method.teacher_index == 2
    hint = method.regressor(inp.student.maps[2])
    assert hint.shape == inp.teachers[0].maps[2].shape == (BATCH, 64, 16, 16)
    assert method(inp)["hint"].item() == pytest.approx(F.mse_loss(hint, inp.teachers[0].maps[2]).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="image size"):
        build("fitnet", student, teachers, image_size=0)


@pytest.mark.parametrize(
    "s_hw,t_hw,first",
    [
        ((16, 16), (16, 16), torch.nn.Conv2d),
        ((32, 32), (16, 16), torch.nn.Conv2d),  # 3x3 stride 2
        ((32, 32), (8, 8), torch.nn.Conv2d),  # 3x3 stride 4
        ((8, 8), (16, 16), torch.nn.ConvTranspose2d),  # 4/2/1
        ((4, 4), (12, 12), torch.nn.ConvTranspose2d),  # odd factor 3
        ((12, 12), (8, 8), torch.nn.AdaptiveAvgPool2d),
        ((7, 7), (8, 8), torch.nn.Upsample),
    ],
)
def test_hint_regressor_output_matches_teacher_shape(s_hw, t_hw, first):
    reg = hint_regressor((5, *s_hw), (6, *t_hw))
    assert isinstance(reg[0], first)
    assert isinstance(reg[-2], torch.nn.BatchNorm2d) and isinstance(reg[-1], torch.nn.ReLU)
    assert reg(torch.randn(2, 5, *s_hw)).shape == (2, 6, *t_hw)


def test_dkd_warmup_schedule():
    dkd = method_class("dkd")(DKDCfg(), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    assert [dkd.loss_weights(e)["dkd"] for e in (1, 10, 20, 21, 240)] == pytest.approx([0.05, 0.5, 1, 1, 1])
    assert dkd.loss_weights(1)["ce"] == 1.0
    no_warmup = method_class("dkd")(DKDCfg(warmup=0), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    assert no_warmup.loss_weights(1)["dkd"] == 1.0


def logit_inputs(scale=1.0, shift=0.0, soft=False) -> StepInputs:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(BATCH, NUM_CLASSES, generator=g) * 2, torch.randn(BATCH, NUM_CLASSES, generator=g) * 5
    y = torch.arange(BATCH) % NUM_CLASSES
    target = F.one_hot(y, NUM_CLASSES).float() * 0.7 + 0.03 if soft else y
    out = lambda z: ModelOutput(torch.zeros(BATCH, 4), z, None)  # noqa: E731
    return StepInputs(
        x=torch.zeros(BATCH, 3, 2, 2),
        target=target,
        index=torch.arange(BATCH),
        epoch=1,
        student=out(s),
        teachers=[out(t * scale + shift)],
    )


def test_standardize_applies_logit_standardisation_to_kd_and_dkd():
    kd_plain = method_class("kd")(KDCfg(), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    kd_std = method_class("kd")(KDCfg(standardize=True), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    inp = logit_inputs()
    s, t = inp.student.logits, inp.teachers[0].logits
    plain, std = kd_plain(inp), kd_std(inp)
    assert std["ce"].item() == plain["ce"].item()  # CE always sees the raw logits
    assert plain["kd"].item() == pytest.approx(kd_loss(s, t, 4.0).item())
    assert std["kd"].item() == pytest.approx(kd_loss(standardize_logits(s), standardize_logits(t), 4.0).item())
    assert std["kd"].item() != pytest.approx(plain["kd"].item(), rel=1e-2)
    # standardised KD ignores the teacher's logit scale and offset; plain KD does not
    rescaled = logit_inputs(scale=3.0, shift=-2.0)
    assert kd_std(rescaled)["kd"].item() == pytest.approx(std["kd"].item(), rel=1e-5)
    assert kd_plain(rescaled)["kd"].item() != pytest.approx(plain["kd"].item(), rel=1e-2)

    y = inp.target
    dkd_std = method_class("dkd")(DKDCfg(standardize=True), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    want = dkd_loss(standardize_logits(s), standardize_logits(t), y, 1.0, 8.0, 4.0)
    assert dkd_std(inp)["dkd"].item() == pytest.approx(want.item(), rel=1e-6)
    assert dkd_std(rescaled)["dkd"].item() == pytest.approx(want.item(), rel=1e-5)


def test_dkd_and_dist_logit_terms():
    inp = logit_inputs()
    s, t, y = inp.student.logits, inp.teachers[0].logits, inp.target
    dkd = method_class("dkd")(DKDCfg(), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    assert dkd(inp)["dkd"].item() == pytest.approx(dkd_loss(s, t, y, 1.0, 8.0, 4.0).item())
    soft = logit_inputs(soft=True)  # MixUp/CutMix labels: DKD uses each row's dominant class
    assert dkd(soft)["dkd"].item() == pytest.approx(dkd_loss(s, t, y, 1.0, 8.0, 4.0).item())
    dist = method_class("dist")(METHOD_SPECS["dist"].config(), None, [], num_classes=NUM_CLASSES, num_train=NUM_TRAIN)
    assert dist(inp)["dist"].item() == pytest.approx(dist_loss(s, t, 1.0, 1.0, 4.0).item())


def test_crd_memory_banks_update_and_z_is_fixed_after_first_batch(nets):
    student, teachers = nets
    method = build("crd", student, teachers)
    assert method.k == NUM_TRAIN - NUM_TRAIN // NUM_CLASSES  # 16384 capped at the other-class count
    assert method.memory_s.shape == method.memory_t.shape == (NUM_TRAIN, 128)
    assert set(method.state_dict()) >= {"memory_s", "memory_t", "z_s", "z_t", "embed_s.weight", "embed_t.weight"}
    assert "train_labels" not in method.state_dict()
    index = torch.tensor([0, 3, 5, 7, 11, 20, 30, 39])
    inp = step_inputs(method, student, teachers, index=index)
    old_s, old_t = method.memory_s.clone(), method.memory_t.clone()
    assert method.z_s.item() == 0 and method.z_t.item() == 0
    method(inp)
    z = (method.z_s.item(), method.z_t.item())
    assert z[0] > 0 and z[1] > 0
    with torch.no_grad():
        e_s = F.normalize(method.embed_s(inp.student.feature), dim=1)
        e_t = F.normalize(method.embed_t(inp.teachers[0].feature), dim=1)
    rest = torch.ones(NUM_TRAIN, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(method.memory_s[rest], old_s[rest]) and torch.equal(method.memory_t[rest], old_t[rest])
    torch.testing.assert_close(method.memory_s[index], F.normalize(0.5 * old_s[index] + 0.5 * e_s, dim=1))
    torch.testing.assert_close(method.memory_t[index], F.normalize(0.5 * old_t[index] + 0.5 * e_t, dim=1))
    terms = method(step_inputs(method, student, teachers, seed=1, index=index + 1 - (index == 39).long() * 2))
    assert (method.z_s.item(), method.z_t.item()) == z and math.isfinite(terms["crd"].item())
    frozen = method.memory_s.clone()
    method.eval()
    method(step_inputs(method, student, teachers, seed=2))
    assert torch.equal(method.memory_s, frozen)  # evaluation does not touch the banks


def test_crd_needs_labels_and_caps_negatives(nets):
    student, teachers = nets
    skewed = torch.cat([torch.zeros(30), torch.ones(10)]).long()
    assert build("crd", student, teachers, train_labels=skewed).k == 10
    assert build("crd", student, teachers, cfg=CRDCfg(nce_k=4)).k == 4
    with pytest.raises(ConfigError, match="training labels"):
        build("crd", student, teachers, train_labels=None)
    with pytest.raises(ConfigError, match="two classes"):
        build("crd", student, teachers, train_labels=torch.zeros(NUM_TRAIN).long())


def test_method_groups_are_validated():
    for flags in (
        ["--method", "dkd", "--dkd.temperature", "0"],
        ["--method", "crd", "--crd.momentum", "1"],
        ["--method", "at", "--at.at-weight", "-1"],
        ["--method", "kd", "--kd.temperature", "nan"],
    ):
        with pytest.raises(ConfigError):
            train.validate(train.parse_config(["--preset", "smoke", *flags]))


# ------------------------------------------------------------------------------------------------ end to end
TINY = [
    "--preset",
    "smoke",
    "--data.synthetic-train-size",
    "400",
    "--data.synthetic-test-size",
    "100",
    "--data.batch-size",
    "32",
    "--optim.epochs",
    "1",
    "--teachers.epochs",
    "1",
    "--run.max-steps-per-epoch",
    "3",
    "--wandb.mode",
    "disabled",
]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher_cache")  # teachers are fine-tuned once for all runs below


@pytest.mark.parametrize("name", [m for m in BASELINES if m != "kd"])
def test_method_trains_end_to_end(tmp_path, teacher_cache, name):
    args = [
        *TINY,
        "--run.out-dir",
        str(tmp_path),
        "--teachers.cache-dir",
        str(teacher_cache),
        "--method",
        name,
        "--run.name",
        name,
    ]
    summary = train.run(train.parse_config(args))
    assert 0.0 <= summary["best/test_acc"] <= 100.0
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if r["phase"] == name][0]
    assert {k[len("train/") :] for k in row if k.startswith("train/")} == {"loss", "ce", TERMS[name], "img_per_s"}
    ce_weight = 0.1 if name == "kd" else 1.0
    want = ce_weight * row["train/ce"] + WEIGHTS_EPOCH1[name] * row[f"train/{TERMS[name]}"]
    assert row["train/loss"] == pytest.approx(want, rel=1e-4)
    state = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)["method"]
    if name == "fitnet":
        assert any(k.startswith("regressor.") for k in state)
    if name == "crd":  # 400 images minus the 40 held out for validation
        assert state["memory_s"].shape == state["memory_t"].shape == (360, 128) and state["z_s"] > 0


# ------------------------------------------------------------------------------------------------ AT taps
def test_at_taps_every_non_stem_map_on_five_map_networks():
    """vgg13 -> vgg8 (5 maps each): AT uses the 4 non-stem maps (RepDistiller feat[1:-1]), not the last 3."""
    torch.manual_seed(0)
    student, teacher = create_model("cifar_vgg8", NUM_CLASSES), create_model("cifar_vgg13", NUM_CLASSES).eval()
    method = build("at", student, [teacher])
    inp = step_inputs(method, student, [teacher])
    assert len(inp.student.maps) == len(inp.teachers[0].maps) == 5
    got = method(inp)["at"]
    assert got.item() == pytest.approx(at_loss(inp.student.maps[1:], inp.teachers[0].maps[1:]).item(), rel=1e-6)
    assert got.item() != pytest.approx(at_loss(inp.student.maps[-3:], inp.teachers[0].maps[-3:]).item(), rel=1e-3)


# ------------------------------------------------------------------------------------------------ multi-teacher
MULTI = method_names("multi-teacher")


def _kl_t2(s, t, temp):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row, written out with explicit softmaxes."""
    p_t = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    p_s = torch.exp(s / temp) / torch.exp(s / temp).sum(1, keepdim=True)
    return temp**2 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(1)


def _ce_rows(logits, y):
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y])


def _logit_inputs(num_teachers, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(BATCH, NUM_CLASSES, generator=g, dtype=torch.float64)).requires_grad_()
    ts = [3 * torch.randn(BATCH, NUM_CLASSES, generator=g, dtype=torch.float64) for _ in range(num_teachers)]
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    out = lambda z: ModelOutput(z.new_zeros(BATCH, 4), z, None)  # noqa: E731
    inp = StepInputs(
        x=torch.zeros(BATCH, 3, 4, 4),
        target=y,
        index=torch.arange(BATCH),
        epoch=1,
        student=out(s),
        teachers=[out(t) for t in ts],
    )
    return s, ts, y, inp


def _total(method, inp, epoch=1):
    terms, weights = method(inp), method.loss_weights(epoch)
    return sum(weights.get(k, 1.0) * v for k, v in terms.items())


@pytest.mark.parametrize("num_teachers", [2, 3])
def test_aver_is_the_mean_of_per_teacher_kd_losses_float64(nets, num_teachers):
    s, ts, y, inp = _logit_inputs(num_teachers)
    method = build("aver", nets[0], list(nets[1]) + [nets[1][0]] * (num_teachers - 2))
    got = _total(method, inp)
    want = _ce_rows(s, y).mean() + sum(_kl_t2(s, t, 4.0).mean() for t in ts) / num_teachers
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-10, atol=1e-12)
    # not KD of the mean logits (--method kd --teachers.select both)
    mean_logit_kd = _kl_t2(s, torch.stack(ts).mean(0), 4.0).mean()
    assert method(inp)["kd"].item() != pytest.approx(mean_logit_kd.item(), rel=1e-3)


@pytest.mark.parametrize("num_teachers", [2, 3])
def test_ebkd_weights_teachers_by_entropy_float64(nets, num_teachers):
    s, ts, y, inp = _logit_inputs(num_teachers, seed=1)
    method = build("ebkd", nets[0], list(nets[1]) + [nets[1][0]] * (num_teachers - 2))
    got = _total(method, inp)
    ent = []
    for t in ts:
        p = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
        ent.append(-(p * torch.log(p)).sum(1))
    kd = 0
    for t, h in zip(ts, ent):
        kd = kd + ((1 - h / sum(ent)) * _kl_t2(s, t, 4.0)).sum()
    want = _ce_rows(s, y).mean() + kd / (BATCH * num_teachers)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_teachers", [2, 3])
def test_camkd_logit_and_feature_terms_float64(num_teachers):
    """CA-MKD as in the authors' code, written out per teacher and sample: values and gradients w.r.t.
    the student's logits, last map and the embedding parameters (through the not-detached weights)."""
    torch.manual_seed(0)
    student = create_model("resnet8", NUM_CLASSES).double()
    archs = ["resnet20", "wrn_16_2", "cifar_vgg8"][:num_teachers]  # vgg8: a 4x4 last map (student's is 8x8)
    teachers = [create_model(a, NUM_CLASSES).double().eval().requires_grad_(False) for a in archs]
    method = build("camkd", student, teachers).double()
    method.train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    with torch.no_grad():
        t_outs = [t(x, with_maps=True) for t in teachers]
    s_out = student(x, with_maps=True)
    inp = StepInputs(x=x, target=y, index=torch.arange(BATCH), epoch=2, student=s_out, teachers=t_outs)
    got = _total(method, inp, epoch=2)

    # independent formula
    s, f_s = s_out.logits, s_out.maps[-1]  # resnet8: no final norm
    ce_t = torch.stack([_ce_rows(t.logits, y) for t in t_outs])  # [M, B]
    w = (1 - torch.exp(ce_t) / torch.exp(ce_t).sum(0, keepdim=True)) / (num_teachers - 1)
    kd = sum((w[m] * _kl_t2(s, t_outs[m].logits, 4.0)).sum() for m in range(num_teachers)) / (BATCH * num_teachers)
    hs, ce_h = [], []
    for m, (teacher, t_out) in enumerate(zip(teachers, t_outs)):
        f_t = teacher.backbone.norm(t_out.maps[-1])  # WRN: the map after its final BN-ReLU (authors' feat[-2])
        size = f_t.shape[2:]
        f = (
            F.adaptive_avg_pool2d(f_s, size)
            if f_s.shape[2] >= size[0]
            else F.interpolate(f_s, size=size, mode="bilinear")
        )
        conv, bn, _ = method.embeds[m]
        z = conv(f)
        mu, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
        h = torch.relu((z - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
        bb = teacher.backbone  # the teacher's head after its last map: head conv / final norm, pool, classifier
        logits_h = bb.head.fc(bb.head_conv(h).mean((2, 3)))
        hs.append(((h - f_t) ** 2).flatten(1).mean(1))
        ce_h.append(_ce_rows(logits_h, y))
    ce_h = torch.stack(ce_h)
    w_f = (1 - torch.exp(ce_h) / torch.exp(ce_h).sum(0, keepdim=True)) / (num_teachers - 1)
    feat = (w_f * torch.stack(hs)).sum() / (BATCH * num_teachers)
    want = _ce_rows(s, y).mean() + kd + 50.0 * feat

    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [s, f_s, *method.embeds.parameters()]
    for a, b in zip(torch.autograd.grad(got, params, retain_graph=True), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # epoch 1: no feature term; the weights differ per sample and favour the lower-CE teacher
    assert method.loss_weights(1)["feat"] == 0.0 and method.loss_weights(2)["feat"] == 50.0
    best = ce_t.argmin(0)
    assert torch.equal(w.argmax(0), best) and torch.allclose(w.sum(0), torch.ones(BATCH, dtype=torch.float64))


def test_multi_teacher_methods_need_two_teachers(nets):
    student, teachers = nets
    for name in MULTI:
        assert method_class(name).multi_teacher
        with pytest.raises(ConfigError, match="several teachers"):
            build(name, student, teachers[:1])
        with pytest.raises(ConfigError, match="several teachers"):
            train.validate(train.parse_config(["--preset", "smoke", "--method", name, "--teachers", "resnet20"]))
    assert not any(method_class(name).multi_teacher for name in BASELINES)


@pytest.mark.parametrize("name", MULTI)
def test_multi_teacher_method_trains_end_to_end_with_every_teacher(tmp_path, teacher_cache, monkeypatch, name):
    seen = {}
    cls = method_class(name)
    original_init = cls.__init__

    def spy(self, cfg, student, teachers, **kw):
        seen["teachers"] = [t.arch for t in teachers]
        original_init(self, cfg, student, teachers, **kw)
        seen["params"] = {k: v.detach().clone() for k, v in self.named_parameters()}

    monkeypatch.setattr(cls, "__init__", spy)
    args = [
        *TINY,
        "--run.out-dir",
        str(tmp_path),
        "--teachers.cache-dir",
        str(teacher_cache),
        "--method",
        name,
        "--run.name",
        name,
        "--teachers.select",
        "0",
    ]  # select is ignored: all teachers
    summary = train.run(train.parse_config(args))
    assert seen["teachers"] == ["resnet20", "wrn_16_2"]
    assert 0.0 <= summary["best/test_acc"] <= 100.0
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if r["phase"] == name][0]
    terms = {"ce", "kd", "feat"} if name == "camkd" else {"ce", "kd"}
    assert {k[len("train/") :] for k in row if k.startswith("train/")} == {"loss", "img_per_s"} | terms
    assert row["train/loss"] == pytest.approx(row["train/ce"] + row["train/kd"], rel=1e-4)  # epoch 1: feat weight 0
    # a zero-weight term stays out of the graph: CA-MKD's embeddings are not decayed in epoch 1
    state = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)["method"]
    for k, v in seen["params"].items():
        assert torch.equal(state[k], v), k


def _camkd_step(student, teachers, epoch=2, seed=5):
    """One CA-MKD forward on a random batch in train mode: (method, inputs, summed loss at `epoch`)."""
    method = build("camkd", student, teachers)
    method.train()
    student.train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    with torch.no_grad():
        t_outs = [t(x, with_maps=True) for t in teachers]
    inp = StepInputs(
        x=x, target=y, index=torch.arange(BATCH), epoch=epoch, student=student(x, with_maps=True), teachers=t_outs
    )
    return method, inp, _total(method, inp, epoch=epoch)


def test_camkd_shufflenetv2_student_taps_the_map_after_its_final_conv_bn_relu():
    """The authors' ShuffleNetv2 returns f3 = ReLU(bn2(conv2(layer3))) (1024 x 4 x 4), not the 464-channel stage
    output; the student's last conv must get the feature term's gradient."""
    from kd.methods.camkd import distill_map

    torch.manual_seed(0)
    student = create_model("shufflenetv2", NUM_CLASSES)
    teachers = [create_model(a, NUM_CLASSES).eval().requires_grad_(False) for a in ("resnet20", "wrn_16_2")]
    method, inp, _ = _camkd_step(student, teachers)
    f_s = distill_map(student, inp.student.maps)
    assert tuple(inp.student.maps[-1].shape[1:]) == (464, 4, 4)
    assert tuple(f_s.shape[1:]) == (1024, 4, 4)
    head = student.backbone.head_conv
    torch.testing.assert_close(f_s, head(inp.student.maps[-1]))  # train mode: batch statistics, as the forward
    assert method.embeds[0][0].in_channels == 1024
    last_conv = head[0].weight
    assert nonzero_grad(method(inp)["feat"], [last_conv])


@pytest.mark.parametrize("arch,bn", [("wrn_16_2", lambda b: b.norm[0]), ("shufflenetv2", lambda b: b.head_conv[1])])
def test_camkd_student_final_batchnorm_updates_once_per_step(arch, bn):
    """distill_map re-applies the student's final norm / head conv: that must not update BatchNorm running
    statistics a second time (num_batches_tracked 1 after one step, running mean = one momentum-0.1 update)."""
    torch.manual_seed(0)
    student = create_model(arch, NUM_CLASSES)
    teachers = [create_model(a, NUM_CLASSES).eval().requires_grad_(False) for a in ("resnet20", "wrn_16_2")]
    norm = bn(student.backbone)
    _, inp, loss = _camkd_step(student, teachers)
    loss.backward()
    assert norm.num_batches_tracked.item() == 1
    assert norm.track_running_stats
    # the forward's own update only: 0.9 * 0 + 0.1 * batch mean of the normalised map's input
    pre = inp.student.maps[-1] if arch == "wrn_16_2" else student.backbone.head_conv[0](inp.student.maps[-1])
    torch.testing.assert_close(norm.running_mean, 0.1 * pre.detach().mean((0, 2, 3)))


def test_zero_weight_terms_are_left_out_of_the_graph_and_their_parameters_untouched():
    """CA-MKD's feature term has weight 0 in epoch 1: the embeddings get no gradient (None, not zeros), so SGD
    with weight decay and momentum leaves them unchanged (the authors' loop leaves the term out in epoch 1)."""
    from kd.methods.base import weighted_loss

    torch.manual_seed(0)
    student = create_model("resnet8", NUM_CLASSES)
    teachers = [create_model(a, NUM_CLASSES).eval().requires_grad_(False) for a in ("resnet20", "wrn_16_2")]
    method = build("camkd", student, teachers)
    before = {k: v.clone() for k, v in method.embeds.named_parameters()}
    params = [*student.parameters(), *method.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for seed in range(2):
        _, inp, _ = _camkd_step(student, teachers, epoch=1, seed=seed)
        inp_terms = method(inp)
        loss = weighted_loss(inp_terms, method.loss_weights(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in method.embeds.parameters())
        opt.step()
    for k, v in method.embeds.named_parameters():
        assert torch.equal(v, before[k]), k
    # epoch 2: the feature term is in the graph and trains the embeddings
    _, inp, _ = _camkd_step(student, teachers, epoch=2)
    loss = weighted_loss(method(inp), method.loss_weights(2))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None for p in method.embeds.parameters())


def test_weighted_loss_is_bitwise_the_plain_weighted_sum_when_no_weight_is_zero():
    from kd.methods.base import weighted_loss

    g = torch.Generator().manual_seed(0)
    terms = {k: torch.rand((), generator=g, dtype=torch.float32) * 10 for k in ("ce", "kd", "feat", "extra")}
    weights = {"ce": 0.1, "kd": 0.9, "feat": 50.0}  # "extra" counts with weight 1
    assert torch.equal(weighted_loss(terms, weights), sum(weights.get(k, 1.0) * v for k, v in terms.items()))
    zero = weighted_loss(terms, {**weights, "feat": 0.0})
    assert torch.equal(zero, 0.1 * terms["ce"] + 0.9 * terms["kd"] + terms["extra"])


# ------------------------------------------------------------------------------------------------ AE-KD
def _simplex_grid(m, steps, upper):
    """Every point of the simplex with coordinates in multiples of 1/steps, each <= upper: [N, m] float64."""
    import itertools

    pts = [c for c in itertools.product(range(steps + 1), repeat=m - 1) if sum(c) <= steps]
    grid = torch.tensor([[*c, steps - sum(c)] for c in pts], dtype=torch.float64) / steps
    return grid[(grid <= upper + 1e-12).all(1)]


def _check_min_norm(v, a, upper):
    """a [M] is the min-norm point of the vectors v [M, D] with weights capped at `upper`: KKT conditions to 1e-10
    (which certify the optimum of this convex problem) and no grid point of the capped simplex does better."""
    gram = v @ v.T
    h = gram @ a  # half the objective's gradient
    assert abs(a.sum().item() - 1) < 1e-12 and (a >= 0).all() and (a <= upper + 1e-12).all()
    free = (a > 1e-9) & (a < upper - 1e-9)
    lam = h[free].mean() if free.any() else None
    scale = gram.diagonal().max().item()
    if lam is not None:
        assert (h[free] - lam).abs().max().item() < 1e-10 * scale
        assert (h[a <= 1e-9] >= lam - 1e-10 * scale).all()
        assert (h[a >= upper - 1e-9] <= lam + 1e-10 * scale).all()
    obj = a @ gram @ a
    grid = _simplex_grid(len(a), 400 if len(a) == 2 else 120, upper)
    grid_obj = torch.einsum("nm,mk,nk->n", grid, gram, grid)
    assert obj.item() <= grid_obj.min().item() + 1e-12 * scale
    step = 1 / (400 if len(a) == 2 else 120)
    best = grid[grid_obj.argmin()]
    assert (best - a).abs().max().item() < 0.15 + step  # the grid's argmin lies near (ill-conditioned: loosely)


def _min_norm_two(v1, v2, upper):
    """Closed form for two vectors: a1 = <v2 - v1, v2> / ||v1 - v2||^2 clipped to [1 - C, C]."""
    a1 = ((v2 - v1) @ v2 / ((v1 - v2) @ (v1 - v2))).clamp(1 - upper, upper)
    return torch.stack([a1, 1 - a1])


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("upper", [1.0, 0.6, 0.45])
def test_min_norm_simplex_weights_against_brute_force(m, upper):
    from kd.losses import min_norm_simplex_weights

    g = torch.Generator().manual_seed(10 * m + int(100 * upper))
    for trial in range(6):
        dim = [2, 5, 10][trial % 3]
        v = torch.randn(m, dim, generator=g, dtype=torch.float64) + (trial % 2) * torch.randn(
            dim, generator=g, dtype=torch.float64
        )
        a = min_norm_simplex_weights(v @ v.T, upper)
        assert a.dtype == torch.float64
        _check_min_norm(v, a, min(max(upper, 1 / m), 1.0))
        if m == 2:
            torch.testing.assert_close(a, _min_norm_two(v[0], v[1], max(upper, 0.5)), rtol=0, atol=1e-10)
    # batched over leading dims; equal vectors: the uniform point; a zero vector takes all the weight it may
    v = torch.randn(4, m, 6, generator=g, dtype=torch.float64)
    batched = min_norm_simplex_weights(v @ v.transpose(1, 2), upper)
    for i in range(4):
        torch.testing.assert_close(batched[i], min_norm_simplex_weights(v[i] @ v[i].T, upper), rtol=0, atol=1e-12)
    same = torch.ones(m, 3, dtype=torch.float64)
    torch.testing.assert_close(
        min_norm_simplex_weights(same @ same.T, upper), torch.full((m,), 1 / m, dtype=torch.float64)
    )
    zero = torch.randn(m, 3, generator=g, dtype=torch.float64)
    zero[0] = 0
    assert min_norm_simplex_weights(zero @ zero.T, upper)[0].item() == pytest.approx(min(max(upper, 1 / m), 1.0))


def _aekd_transcription(s, ts, y, temp, upper, per_sample=False, normalize=False):
    """AE-KD written out: autograd gradients of each teacher's batch-mean KD loss w.r.t. the student's logits
    (as the CA-MKD code takes them), their batch mean (or each row), the min-norm weights (closed form for two
    teachers, else the solver's, certified by _check_min_norm), then CE + sum_m a_m KD_m."""
    from kd.losses import min_norm_simplex_weights

    grads = []
    for t in ts:
        leaf = s.detach().clone().requires_grad_()
        grads.append(torch.autograd.grad(_kl_t2(leaf, t, temp).mean(), leaf)[0])  # [B, C], = T (p_s - p_t) / B
    grads = torch.stack(grads)  # [M, B, C]
    groups = [grads[:, b] for b in range(BATCH)] if per_sample else [grads.mean(1)]
    weights = []
    for v in groups:  # [M, C]
        norms = v.norm(dim=1)
        u = v / norms[:, None] if normalize else v
        cap = min(max(upper, 1 / len(ts)), 1.0)  # the cap is clamped to [1/M, 1]
        a = _min_norm_two(u[0], u[1], cap) if len(ts) == 2 else min_norm_simplex_weights(u @ u.T, upper)
        _check_min_norm(u, a, cap)
        if normalize:
            a = a / norms / (a / norms).sum()
        weights.append(a)
    kd_rows = torch.stack([_kl_t2(s, t, temp) for t in ts])  # [M, B]
    if per_sample:
        kd = sum((weights[b] * kd_rows[:, b]).sum() for b in range(BATCH)) / BATCH
    else:
        kd = sum(weights[0][m] * kd_rows[m].mean() for m in range(len(ts)))
    return _ce_rows(s, y).mean() + kd, torch.stack(weights)


@pytest.mark.parametrize("num_teachers", [2, 3])
@pytest.mark.parametrize(
    "variant",
    [{}, {"per_sample": True}, {"normalize_grads": True}, {"tolerance": 1.0}, {"tolerance": 0.4, "per_sample": True}],
)
def test_aekd_matches_its_transcription_float64(nets, num_teachers, variant):
    from kd.configs import AEKDCfg

    s, ts, y, inp = _logit_inputs(num_teachers, seed=7)
    cfg = AEKDCfg(**variant)
    method = build("aekd", nets[0], list(nets[1]) + [nets[1][0]] * (num_teachers - 2), cfg=cfg)
    got = _total(method, inp)
    want, weights = _aekd_transcription(s, ts, y, 4.0, cfg.tolerance, cfg.per_sample, cfg.normalize_grads)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-10, atol=1e-12)
    uniform = torch.allclose(weights, torch.full_like(weights, 1 / num_teachers))
    assert uniform == (cfg.tolerance <= 1 / num_teachers)  # not AVER, unless the cap forces equal weights
    if cfg.tolerance < 1 and not cfg.normalize_grads:
        assert weights.max().item() <= min(max(cfg.tolerance, 1 / num_teachers), 1.0) + 1e-12


def test_aekd_config_and_teacher_limits(nets):
    from kd.configs import AEKDCfg

    with pytest.raises(ConfigError, match="tolerance"):
        AEKDCfg(tolerance=0.0).check()
    with pytest.raises(ConfigError, match="at most 6"):
        build("aekd", nets[0], [nets[1][0]] * 7)
    cfg = train.parse_config(
        ["--preset", "smoke", "--method", "aekd", "--aekd.tolerance", "0.7", "--aekd.per-sample", "true"]
    )
    assert cfg.aekd.tolerance == 0.7 and cfg.aekd.per_sample


CRD_RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, os.environ["KD_ROOT"])
from kd.methods import METHOD_SPECS, method_class
from kd.models import create_model
rank = int(os.environ["RANK"])
torch.distributed.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=2)
torch.manual_seed(100 + rank)  # ranks seeded differently: only the broadcast makes their banks agree
student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)
cls, cfg_cls = method_class("crd"), METHOD_SPECS["crd"].config
method = cls(cfg_cls(), student, [teacher], num_classes=10, num_train=40, train_labels=torch.arange(40) % 10)
torch.save(method.state_dict(), os.environ["OUT"])
torch.distributed.destroy_process_group()
"""


def test_crd_banks_are_broadcast_from_rank0_across_processes(tmp_path):
    """kd builds DDP with broadcast_buffers=False, so CRD broadcasts its banks, z and sample seed itself: two gloo
    processes seeded differently end up with rank 0's buffers (the embeddings are DDP parameters: synced by DDP)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "rank.py"
    script.write_text(CRD_RANK_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "KD_ROOT": root,
            "RANK": str(rank),
            "STORE": str(tmp_path / "store"),
            "OUT": str(tmp_path / f"rank{rank}.pt"),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("memory_s", "memory_t", "z_s", "z_t", "sample_seed", "sample_step"):
        assert torch.equal(states[0][key], states[1][key]), key
    torch.manual_seed(100)  # rank 0's own draw, not rank 1's
    student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)
    alone = build("crd", student, [teacher], num_classes=10, num_train=40, train_labels=torch.arange(40) % 10)
    assert torch.equal(alone.memory_s, states[0]["memory_s"]) and torch.equal(
        alone.sample_seed, states[0]["sample_seed"]
    )
    assert not torch.equal(states[1]["embed_s.weight"], states[0]["embed_s.weight"])  # the RNGs did differ

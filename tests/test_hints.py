"""Feature (hint) distillation: which maps are matched, that the student learns the teacher's, resume, refusals."""

import pytest
import torch
from torch import nn

from edgekd import DistillConfig, KDConfig, ModelConfig, RecipeConfig, train
from edgekd.checkpoint import load_checkpoint, load_model
from edgekd.errors import EdgeKDError
from tests.conftest import Stop, stop_after_epoch
from edgekd.hints import build_hint, last_spatial_module
from edgekd.losses import hint_loss


def test_the_last_map_with_more_than_one_position_is_matched():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    module, shape = last_spatial_module(net, torch.rand(2, 3, 8, 8))
    assert module is net[4] and tuple(shape) == (2, 6, 4, 4)  # the ReLU before global pooling, not the 1x1 pool
    assert net.training  # probing leaves the mode as it was


@pytest.mark.parametrize("arch", ["resnet8", "edge_resnet_s", "seed002_student", "fastcnn"])
def test_the_matched_map_is_what_global_pooling_reads(arch):
    """A ResNet block adds its shortcut and applies its ReLU inside forward: its last leaf (the shortcut's
    batch norm) is not its output. The matched map must be exactly the final feature map."""
    from edgekd.zoo import build_model, pool_before_activation

    net = pool_before_activation(build_model(arch, 10, 3, (32, 32)))
    probe = torch.rand(2, 3, 32, 32)
    module, shape = last_spatial_module(net, probe)
    pooled_input = []
    head = [m for m in net.modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten))]
    hook = (head[0].register_forward_hook(lambda m, i, o: pooled_input.append(i[0])) if head else None)
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append(o))
    net.eval()
    with torch.no_grad():
        net(probe)
    handle.remove()
    if hook:
        hook.remove()
    final = pooled_input[0] if pooled_input else None
    if final is None or final.dim() != 4:  # functional pooling (zoo's ResNets): the map that feeds it is the last stage's
        final = net.layers(net.stem(probe)) if hasattr(net, "layers") else got[0]
    assert torch.equal(got[0], final) and tuple(shape) == tuple(final.shape), arch


def test_hint_loss_pools_to_the_smaller_map_and_is_scale_free():
    t = torch.randn(3, 5, 2, 2)
    s = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # the same map at twice the size
    assert float(hint_loss(s, t)) < 1e-12
    assert torch.isclose(hint_loss(torch.zeros_like(t), 10 * t), torch.tensor(1.0))


def _hint_cfg(teacher, hint_weight=4.0, cache_views=0, epochs=3):
    return DistillConfig(model=ModelConfig(arch="resnet8"),
                         recipe=RecipeConfig(epochs=epochs, batch_size=32, lr=0.05, augment_pad=0, augment_flip=False),
                         kd=KDConfig(teachers=(str(teacher),), cache_views=cache_views, hint_weight=hint_weight,
                                     warmup_epochs=0.0))


def _relative_mse(student_ckpt, teacher_ckpt, adapter_state, x_unit) -> float:
    student, s_meta = load_model(student_ckpt)
    hint = build_hint(str(teacher_ckpt), student, x_unit[:2], lambda x: (x - torch.tensor(s_meta["mean"]).view(1, -1, 1, 1))
                      / torch.tensor(s_meta["std"]).view(1, -1, 1, 1), "cpu")
    if adapter_state is not None:
        hint.adapter.load_state_dict(adapter_state)
    hint.student_tap.training_only = False  # read this no-grad pass, in train mode (batch statistics) as training saw it
    with torch.no_grad():
        _, t_feat = hint.teacher_outputs(x_unit)
        student.train()((x_unit - torch.tensor(s_meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(s_meta["std"]).view(1, -1, 1, 1))
        return float(hint_loss(hint.adapter(hint.student_tap.take()), t_feat))


def test_the_student_learns_the_teachers_feature_map_and_resumes_exactly(synth, tmp_path, teacher_run):
    teacher = teacher_run.out_dir / "best.pt"
    x_val = synth.val_x.float() / 255.0
    untrained = _relative_mse(teacher, teacher, None, x_val)  # any network, a fresh adapter: about 1 or worse
    full = train(_hint_cfg(teacher), tmp_path / "full", data=synth)
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    assert set(last["hint_adapter"]) == {"weight"}
    assert not any("adapter" in k for k in load_checkpoint(tmp_path / "full" / "best.pt")["state_dict"])
    learned = _relative_mse(tmp_path / "full" / "last.pt", teacher, last["hint_adapter"], x_val)  # weights and adapter of one epoch
    assert learned < 0.5 < untrained, (learned, untrained)
    plain = train(_hint_cfg(teacher, hint_weight=0.0), tmp_path / "plain", data=synth)
    assert plain.history[-1]["train_loss"] != full.history[-1]["train_loss"]  # the term is in the loss

    with pytest.raises(Stop):
        train(_hint_cfg(teacher), tmp_path / "cut", data=synth, on_step=stop_after_epoch(1))
    train(_hint_cfg(teacher), tmp_path / "cut", data=synth, resume=True)
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in last["state_dict"].items():
        assert torch.allclose(v.float(), cut["state_dict"][k].float(), atol=1e-5), k
    assert torch.allclose(last["hint_adapter"]["weight"], cut["hint_adapter"]["weight"], atol=1e-5)


def test_hints_need_one_checkpoint_teacher_answering_every_batch(synth, tmp_path, teacher_run):
    teacher = teacher_run.out_dir / "best.pt"
    with pytest.raises(EdgeKDError, match="needs exactly one teacher answering every batch"):
        train(_hint_cfg(teacher, cache_views=2), tmp_path / "cached", data=synth)
    onnx_teacher = tmp_path / "teacher.onnx"
    onnx_teacher.write_bytes(b"not read: refused by its suffix first")
    with pytest.raises(EdgeKDError, match="needs an edgekd checkpoint teacher"):
        train(_hint_cfg(onnx_teacher), tmp_path / "onnx", data=synth)
    assert not (tmp_path / "cached").exists()
    model, _ = load_model(teacher)
    scripted = tmp_path / "scripted.pt"
    torch.jit.trace(model.eval(), torch.rand(1, 3, *synth.image_size)).save(str(scripted))
    with pytest.raises(EdgeKDError, match="needs an edgekd checkpoint teacher, and scripted.pt is torchscript"):
        train(_hint_cfg(scripted), tmp_path / "scripted", data=synth)
    assert not (tmp_path / "scripted").exists()

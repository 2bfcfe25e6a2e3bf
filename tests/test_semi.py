"""Training on unlabelled images too (``train.unlabeled``): mean-teacher consistency."""

from __future__ import annotations

import pytest
import torch

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.training import semi
from medseg.training.semi import RAMP_UP, MeanTeacher, consistency_weight, cutmix_masks, unlabeled_loss
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.test_resume import SETTINGS, whole_and_resumed


def _no_labelled_loss(logits, label):
    """A loss that teaches nothing: only the unlabelled term can move the weights."""
    first = logits[0] if isinstance(logits, list) else logits
    return first.sum() * 0.0


def _weights_after_two_steps(data, out, unlabeled, extra=()) -> tuple[dict, dict]:
    overrides = [
        *TINY_OVERRIDES,
        "train.weight_decay=0",
        "data.val_fraction=0",
        "train.tensorboard=false",
        *extra,
    ]
    if unlabeled:
        overrides.append(f"train.unlabeled={unlabeled}")
    config = load_config(None, overrides)
    config.data.root, config.train.output_dir = str(data), str(out)
    trainer = Trainer(config, loss_fn=_no_labelled_loss)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.fit()  # (batch-norm statistics follow the data whatever the loss: weights only)
    return before, dict(trainer.model.named_parameters())


def test_the_unlabelled_loss_moves_the_weights(tiny_dataset, tmp_path):
    # Without unlabelled images, a loss that teaches nothing leaves every weight where it was...
    before, after = _weights_after_two_steps(tiny_dataset, tmp_path / "plain", None)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...with them, the consistency with the teacher moves them, and the teacher is saved.
    before, after = _weights_after_two_steps(tiny_dataset, tmp_path / "semi", tiny_dataset / "imagesTs")
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2
    saved = torch.load(tmp_path / "semi" / "last.pt", weights_only=True)
    assert saved["teacher"]["updates"] == 2


def test_confident_pseudo_labels_move_the_weights_only_where_the_teacher_is_sure(tiny_dataset, tmp_path):
    sure = ["train.unlabeled_loss=confident", "train.confidence=0.01"]  # every voxel counts
    before, after = _weights_after_two_steps(tiny_dataset, tmp_path / "sure", tiny_dataset / "imagesTs", sure)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    # An untrained teacher is never 100 % sure: nothing is learnt from it.
    never = ["train.unlabeled_loss=confident", "train.confidence=1"]
    before, after = _weights_after_two_steps(
        tiny_dataset, tmp_path / "never", tiny_dataset / "imagesTs", never
    )
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_confident_loss_is_cross_entropy_on_the_sure_voxels_over_all():
    student = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.6, 0.4]])).T[None]  # (1, C, 4)
    teacher = torch.tensor([[0.97, 0.03], [0.10, 0.90], [0.02, 0.98], [0.50, 0.50]]).T[None]
    # sure at 0.9: voxels 0 (class 0), 1 (class 1) and 2 (class 1); voxel 3 is not
    expected = (
        -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.1))) / 4
    )
    assert unlabeled_loss(student, teacher, "confident", 0.9).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    assert unlabeled_loss(student, teacher, "confident", 0.99).item() == 0.0
    mse = ((student.softmax(1) - teacher) ** 2).mean()
    assert unlabeled_loss(student, teacher, "mse", 0.9).item() == pytest.approx(mse.item())
    with pytest.raises(ConfigError, match="train.unlabeled_loss.*mse or confident, not 'l1'"):
        MeanTeacher(torch.nn.Conv3d(1, 2, 1), 0.99, 1.0, "l1")
    with pytest.raises(ConfigError, match=r"train.confidence.*\(0, 1\], not 0"):
        MeanTeacher(torch.nn.Conv3d(1, 2, 1), 0.99, 1.0, "confident", 0)


def test_cutmix_pastes_one_box_of_the_next_patch_into_each():
    shape = torch.Size((3, 1, 16, 12, 8))
    masks = cutmix_masks(shape, torch.Generator().manual_seed(5))
    assert masks.shape == (3, 1, 16, 12, 8)
    for mask in masks[:, 0]:
        inside = mask.nonzero()
        lo, hi = inside.min(0).values, inside.max(0).values
        assert (hi - lo + 1).tolist() == [13, 10, 6]  # each side 0.5 ** (1/3) of the patch's
        assert mask.sum() == 13 * 10 * 6  # one solid box
    assert not torch.equal(masks[0], masks[1])  # each patch its own place
    assert torch.equal(masks, cutmix_masks(shape, torch.Generator().manual_seed(5)))  # a resume cuts the same
    images = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(shape)
    mixed = semi.paste(masks, images)
    assert torch.equal(mixed[1][masks[1] == 1], torch.full((13 * 10 * 6,), 1.0))  # its own box
    assert torch.equal(mixed[1][masks[1] == 0], torch.zeros(16 * 12 * 8 - 13 * 10 * 6))  # the patch before
    assert torch.equal(mixed[0][masks[0] == 0], torch.full((16 * 12 * 8 - 13 * 10 * 6,), 2.0))  # the last


def test_cutmix_pulls_the_student_on_the_mix_towards_the_teachers_answers_mixed_alike(monkeypatch):
    # A voxel-wise network answers a pasted input with its answers pasted: with the teacher's
    # noise off and the teacher still the student, the loss is zero only if the student's
    # input and the teacher's answers were cut and pasted alike.
    monkeypatch.setattr(semi, "TEACHER_NOISE", (0.0, 0.0))
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 1)
    teacher = MeanTeacher(net, 0.99, 1.0, mix="cutmix")
    images = torch.randn(2, 1, 8, 8, 8)
    masks = teacher.masks(images, seed=7)
    student = net(teacher.student_input(images, masks))
    no_autocast = torch.autocast("cpu", enabled=False)
    assert teacher.loss(student, images, lambda: no_autocast, 7, masks).item() < 1e-12
    assert teacher.loss(net(images), images, lambda: no_autocast, 7, masks).item() > 1e-4  # input not mixed
    assert teacher.loss(student, images, lambda: no_autocast, 7, None).item() > 1e-4  # answers not mixed
    assert MeanTeacher(net, 0.99, 1.0).masks(images, 7) is None  # the default mixes nothing
    with pytest.raises(ConfigError, match="train.unlabeled_mix.*none or cutmix, not 'mixup'"):
        MeanTeacher(net, 0.99, 1.0, mix="mixup")


def test_cutmix_consistency_moves_the_weights_and_needs_two_patches(tiny_dataset, tmp_path):
    mixed = ["train.unlabeled_mix=cutmix", "train.batch_size=2"]
    before, after = _weights_after_two_steps(tiny_dataset, tmp_path / "mix", tiny_dataset / "imagesTs", mixed)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    with pytest.raises(ConfigError, match="train.unlabeled_mix.*batch_size of 2 or more, not 1"):
        _weights_after_two_steps(tiny_dataset, tmp_path / "one", tiny_dataset / "imagesTs", mixed[:1])


def test_the_consistency_weight_ramps_up():
    assert consistency_weight(0.0, 2.0) == pytest.approx(2.0 * 2.718281828 ** (-5))
    assert consistency_weight(RAMP_UP / 2, 2.0) == pytest.approx(2.0 * 2.718281828 ** (-1.25))
    assert consistency_weight(RAMP_UP, 2.0) == consistency_weight(0.9, 2.0) == 2.0


def test_a_killed_semi_supervised_run_resumes_exactly(tiny_dataset, tmp_path):
    # with cutmix: the teacher's noise and the boxes must both be drawn again alike
    cutmix = ["train.unlabeled_mix=cutmix", "train.batch_size=2"]
    settings = [*SETTINGS, f"train.unlabeled={tiny_dataset / 'imagesTs'}", *cutmix]
    whole, again = whole_and_resumed(tiny_dataset, tmp_path, settings)
    assert again["step"] == whole["step"] == 8
    assert again["teacher"]["updates"] == whole["teacher"]["updates"] == 8
    for key, tensor in whole["teacher"]["weights"].items():
        torch.testing.assert_close(again["teacher"]["weights"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    for key, tensor in whole["train_model"].items():
        torch.testing.assert_close(again["train_model"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_the_command_line_takes_unlabelled_images_and_names_a_bad_folder(tiny_dataset, tmp_path):
    tiny = [x for o in TINY_OVERRIDES for x in ("--set", o)]
    args = ["train", "--data", str(tiny_dataset), "--output", str(tmp_path / "run"), *tiny]
    proc = run_cli(*args, "--unlabeled", str(tiny_dataset / "imagesTs"))
    assert proc.returncode == 0, proc.stderr
    assert "teacher" in torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    missing = tmp_path / "nowhere"
    proc = run_cli(*args[: -len(tiny)], "--output", str(tmp_path / "run2"), "--unlabeled", str(missing))
    assert (
        proc.returncode == 2
        and f"error: {missing}: no such folder or CSV of unlabelled images" in proc.stderr
    )
    assert not (tmp_path / "run2").exists()  # refused before the run folder was made

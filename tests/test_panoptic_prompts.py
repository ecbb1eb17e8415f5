"""Query groups (incremental.panoptic.prompts): the pure pieces by hand, the model's guarantees, the
runner's and the updater's use of them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from incremental.cli import main
from incremental.package import load_model, save_model
from incremental.panoptic.model import PanopticMask2Former, build_panoptic_model
from incremental.panoptic.prompts import FILL, PromptedMask2Former, full_width_logits, group_features, newer_claims
from incremental.panoptic.training import make_optimizer
from tests.test_panoptic_runner import run_cli, write_config

TINY = dict(n_queries=4, hidden_dim=16, n_layers=2, n_heads=2, ffn_dim=16, mask_dim=16, backbone_channels=[8, 8, 8])


def test_full_width_logits_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 9.0]]])  # two classes of a group starting at class 3, then no object
    out = full_width_logits(logits, first=3, n_total=6)
    assert out.tolist() == [[[FILL, FILL, FILL, 1.0, 2.0, FILL, 9.0]]]
    assert out.softmax(-1)[0, 0, :3].sum() == 0  # classes the queries do not answer get probability 0


def test_newer_claims_by_hand():
    big = 10.0
    # 1 image, 4x4 masks; deployed queries: q0 on the left half, q1 a single pixel at the right edge
    old_masks = torch.full((1, 2, 4, 4), -big)
    old_masks[0, 0, :, :2] = big
    old_masks[0, 1, 0, 3] = big
    old_logits = torch.tensor([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])  # 2 classes + no object
    # one group query: confident (p = e^4 / (e^4 + 2) = 0.96) over the three left columns
    new_masks = torch.full((1, 1, 4, 4), -big)
    new_masks[0, 0, :, :3] = big
    new_logits = torch.tensor([[[FILL, FILL, 4.0, 0.0]]])
    old_full = full_width_logits(old_logits, 0, 3)
    out_old, out_new = newer_claims([old_full, new_logits], [old_masks, new_masks], score_threshold=0.5, cover=0.5)
    # q0 lies entirely inside the group's mask: it answers no object; q1 (outside) keeps its logits
    assert out_old[0, 0, :-1].tolist() == [FILL, FILL, FILL] and out_old[0, 0, -1] == 0.0
    assert torch.equal(out_old[0, 1], old_full[0, 1])
    assert torch.equal(out_new, new_logits)
    # by IoU, q0 (8 pixels) and the group's mask (12 pixels) agree on 8 / 12 = 0.67: claimed at 0.6, not at 0.7
    assert (newer_claims([old_full, new_logits], [old_masks, new_masks], 0.5, 0.6, "iou")[0][0, 0, :-1] == FILL).all()
    assert torch.equal(newer_claims([old_full, new_logits], [old_masks, new_masks], 0.5, 0.7, "iou")[0], old_full)
    # an unconfident group query (p = 0.5 < 0.6) claims nothing
    weak = torch.tensor([[[FILL, FILL, 0.0, 0.0]]])
    assert torch.equal(newer_claims([old_full, weak], [old_masks, new_masks], 0.6, 0.5)[0], old_full)


def test_newer_claims_yield_by_hand():
    big = 10.0
    # 4x4 masks; deployed q0 (class 0) on the two left columns, q1 (class 0) one pixel at the top right
    old_masks = torch.full((1, 2, 4, 4), -big)
    old_masks[0, 0, :, :2] = big
    old_masks[0, 1, 0, 3] = big
    old_full = full_width_logits(torch.tensor([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]]), 0, 3)
    # a confident group query on the three right columns (12 pixels): it holds all of q1 (a claim) and
    # half of q0 (4 of q0's 8 pixels: no claim at cover 0.7), which is 4 / 12 = 0.33 of its own mask
    new_masks = torch.full((1, 1, 4, 4), -big)
    new_masks[0, 0, :, 1:] = big
    new_logits = torch.tensor([[[FILL, FILL, 4.0, 0.0]]])
    args = ([old_full, new_logits], [old_masks, new_masks], 0.5, 0.7, "ioa")
    out_old, out_new = newer_claims(*args)  # no yielding: q1 claimed, q0 and the group keep their answers
    assert (out_old[0, 1, :-1] == FILL).all() and torch.equal(out_old[0, 0], old_full[0, 0])
    assert torch.equal(out_new, new_logits)
    # yield at 0.3: 0.33 of the group's mask is on q0, which it does not claim: the group answers no
    # object and its claim on q1 is withdrawn
    out_old, out_new = newer_claims(*args, yield_overlap=0.3)
    assert torch.equal(out_old, old_full)
    assert out_new[0, 0, :-1].tolist() == [FILL, FILL, FILL] and out_new[0, 0, -1] == 0.0
    # at 0.4 the overlap is too small to yield; and only queries of the yield classes count
    assert torch.equal(newer_claims(*args, yield_overlap=0.4)[1], new_logits)
    only_class_1 = torch.tensor([False, True, False])  # one entry per class
    assert torch.equal(newer_claims(*args, yield_overlap=0.3, yield_classes=only_class_1)[1], new_logits)


def grown(n_groups: int = 1) -> PromptedMask2Former:
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=3, prompt_queries=2, **TINY)
    for k in range(n_groups):
        assert model.grow_to(4 + k)
    return model


def test_group_features_recompute_the_last_levels_from_the_frozen_one_before():
    feats = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([4.0])]
    assert group_features(feats, torch.nn.ModuleList()) is feats

    class Times(torch.nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.k

    # two own stages: level 2 = 10 x frozen level 1 (2 -> 20), level 3 = 100 x the new level 2 (-> 2000)
    out = group_features(feats, torch.nn.ModuleList([Times(10.0), Times(100.0)]))
    assert [float(f) for f in out] == [1.0, 2.0, 20.0, 2000.0]
    assert out[0] is feats[0] and out[1] is feats[1]


@pytest.mark.parametrize("own", [{}, {"prompt_own_layers": True, "prompt_own_pixel_decoder": True},
                                 {"prompt_own_pixel_decoder": True, "prompt_own_backbone": 2},
                                 {"prompt_own_backbone": 1}])
def test_deployed_queries_answer_as_before_and_only_the_new_group_trains(own):
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=3, prompt_queries=2, **TINY, **own)
    assert isinstance(model, PromptedMask2Former)
    images = torch.rand(2, 3, 32, 32)
    # frozen as grow_to leaves it: with no weight requiring a gradient, torch's attention takes its fused
    # inference kernel, which rounds differently in the last bits from the one used while training
    before = model.eval().requires_grad_(False)(images)
    model.grow_to(5)  # one group for classes 3 and 4
    model.claims = False  # the deployed queries' own outputs, before the merge rule
    after = model(images)
    assert after["pred_logits"].shape == (2, 4 + 2, 6) and model.n_classes == 5
    # the deployed queries run the deployed decoder alone: the same numbers to the last bit
    assert torch.equal(after["pred_logits"][:, :4, :3], before["pred_logits"][:, :, :3])
    assert torch.equal(after["pred_logits"][:, :4, -1], before["pred_logits"][:, :, -1])
    assert torch.equal(after["pred_masks"][:, :4], before["pred_masks"])
    assert (after["pred_logits"][:, :4, 3:5] == FILL).all() and (after["pred_logits"][:, 4:, :3] == FILL).all()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("groups.0.") for n in trainable)
    # training returns the new group alone (its classes are the step's annotations), gradients reach it only
    out = model.train()(images)
    assert out["pred_logits"].shape == (2, 2, 6) and len(out["aux_outputs"]) == 2
    (out["pred_logits"][..., 3:].sum() + out["pred_masks"].sum()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert model.groups[0].prompts.grad is not None and model.groups[0].query_feat.grad is not None
    copies = {n.split(".")[2] for n in trainable if n.split(".")[2] in ("layers", "pixel_decoder", "backbone_stages")}
    expected = {"layers": "prompt_own_layers", "pixel_decoder": "prompt_own_pixel_decoder",
                "backbone_stages": "prompt_own_backbone"}
    assert copies == {part for part, option in expected.items() if own.get(option)}
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable and "backbone_stages" in n)
    # own_backbone = k copies the deepest k stages (stage3, then stage2, ...)
    stages = model.groups[0].backbone_stages
    assert len(stages) == own.get("prompt_own_backbone", 0)
    deepest = [model.backbone.stage1, model.backbone.stage2, model.backbone.stage3][3 - len(stages):]
    for copy_, original in zip(stages, deepest):
        assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), original.state_dict().values()))
    kwargs = model.arch_kwargs()
    assert kwargs["prompt_own_pixel_decoder"] == bool(own.get("prompt_own_pixel_decoder"))
    assert kwargs["prompt_own_backbone"] == own.get("prompt_own_backbone", 0)
    rebuilt = build_panoptic_model(**kwargs)
    rebuilt.load_state_dict(model.state_dict())  # the same modules, so a package restores it


def test_a_second_group_freezes_the_first_and_rebuilds_from_its_arch_kwargs():
    model = grown(2).eval()
    assert [g.first_class for g in model.groups] == [3, 4]
    assert not any(p.requires_grad for p in model.groups[0].parameters())
    assert all(p.requires_grad for p in model.groups[1].parameters())
    kwargs = model.arch_kwargs()
    assert kwargs["prompt_groups"] == [1, 1] and kwargs["n_classes"] == 5 and kwargs["prompt_queries"] == 2
    assert kwargs["prompt_claim_cover"] == 0.7
    assert kwargs["prompt_claim_yield"] is None and kwargs["prompt_thing_classes"] is None
    rebuilt = build_panoptic_model(**kwargs).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(rebuilt(images)["pred_logits"], model(images)["pred_logits"])
    with pytest.raises(ValueError, match="prompt_groups"):
        build_panoptic_model(n_classes=5, prompt_queries=2, prompt_groups=[0], **TINY)
    plain = build_panoptic_model(n_classes=3, **TINY)
    assert type(plain) is PanopticMask2Former and plain.arch_kwargs()["n_classes"] == 3


def test_the_model_applies_the_yield_rule_to_its_thing_classes():
    model = grown(1).eval()
    with torch.no_grad():  # every query confident: deployed ones in class 0, the group's in class 3
        model.class_head.linear.bias[0] = 20.0
        model.groups[0].class_head.bias[0] = 20.0
    images = torch.rand(2, 3, 32, 32)
    model.claims = False
    raw = model(images)
    dep, grp = raw["pred_logits"].split([4, 2], 1)
    mdep, mgrp = raw["pred_masks"].split([4, 2], 1)
    # no claims (cover 1) and any overlap with a confident thing query yields
    model.claims, model.claim_cover, model.claim_yield = True, 1.0, 0.0
    for things in ([0, 1, 2, 3], [0, 2], []):
        model.thing_classes = things
        mask = torch.zeros(4, dtype=torch.bool)
        mask[things] = True
        expected = torch.cat(newer_claims([dep, grp], [mdep, mgrp], 0.5, 1.0, "ioa", 0.0, mask), 1)
        assert torch.equal(model(images)["pred_logits"], expected)
        yielded = (expected[:, 4:, 3] == FILL).sum()  # group queries that gave way to a class-0 query
        assert bool(yielded > 0) == (0 in things)
    model.claim_cover, model.claim_yield = 0.7, None  # no yield: the claims alone
    assert torch.equal(model(images)["pred_logits"], torch.cat(newer_claims([dep, grp], [mdep, mgrp], 0.5, 0.7), 1))
    with pytest.raises(ValueError, match="prompt_claim_yield"):
        build_panoptic_model(n_classes=3, prompt_queries=2, prompt_claim_yield=2.0, **TINY)
    with pytest.raises(ValueError, match="prompt_own_backbone must be 0-3"):
        build_panoptic_model(n_classes=3, prompt_queries=2, prompt_own_backbone=4, **TINY)


def test_the_optimizer_holds_the_group_with_its_head_at_the_head_rate():
    model = grown(1)
    opt = make_optimizer(model, 1e-3, 0.0, head_lr=1e-2)
    head = {id(p) for p in model.groups[0].class_head.parameters()}
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert set(rates) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(rates[i] == 1e-2 for i in head) and sum(r == 1e-3 for r in rates.values()) == len(rates) - len(head)


RUN = {
    "seed": 0,
    "scenario": {"name": "panoptic_shapes", "steps": [["circle", "square", "sky", "ground"], ["cross"], ["ring"]],
                 "train_images": [8, 4, 4], "test_images": 4, "image_size": 32},
    "strategy": {"plugins": []},
    "model": {"n_queries": 4, "hidden_dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 16, "mask_dim": 16,
              "backbone_channels": [8, 8, 8], "prompt_queries": 2},
    "train": {"base_epochs": 1, "step_epochs": 1, "batch_size": 4, "eval_batch_size": 4},
    "sample_images": 0,
}


@pytest.fixture()
def run_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, RUN)


def test_a_run_with_query_groups_keeps_the_deployed_model_and_resumes_identically(run_config, tmp_path):
    first = run_cli(run_config, tmp_path / "a")
    assert len(first["pq_all"]) == 3
    deployed = load_model(tmp_path / "a" / "model_step0.pt").build().state_dict()
    final = load_model(tmp_path / "a" / "model.pt")
    assert final.arch_kwargs["prompt_groups"] == [1, 1] and final.class_names[-2:] == ["cross", "ring"]
    assert final.arch_kwargs["prompt_thing_classes"] == [0, 1, 4, 5]  # circle, square, cross, ring
    weights = final.build().state_dict()
    assert all(torch.equal(weights[k], v) for k, v in deployed.items())  # every deployed weight untouched
    # killed after step 1: the restore must rebuild the step-1 group alone (it grows one step at a time)
    second = run_cli(run_config, tmp_path / "b")
    for f in (tmp_path / "b" / "checkpoints").glob("exp_003.*"):
        f.unlink()
    (tmp_path / "b" / "results.json").unlink()
    resumed = run_cli(run_config, tmp_path / "b", "--resume")
    assert first["pq_all"] == second["pq_all"] == resumed["pq_all"]
    assert first["pq_per_class"] == resumed["pq_per_class"]


@pytest.mark.parametrize("override, message", [
    ("strategy={plugins: [{name: pseudo_label_distillation}]}", "model.prompt_queries: query groups leave"),
    ("strategy={plugins: [{name: replay}], history: {mem_size: 8}}", "model.prompt_queries: a query group learns"),
    ("model.prompt_queries=-1", "model.prompt_queries: must be >= 0"),
    ("model.prompt_claim_cover=1.5", "model.prompt_claim_cover: must be in [0, 1]"),
    ("model.prompt_claim_yield=1.5", "model.prompt_claim_yield: must be in [0, 1] or null"),
])
def test_query_groups_refuse_what_they_cannot_use(run_config, tmp_path, capsys, override, message):
    assert main(["run", str(run_config), "--out", str(tmp_path / "x"), "--quiet", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_update_of_a_package_with_query_groups_adds_a_group(tmp_path):
    from incremental.panoptic.shapes import SplitSpec, generate_split
    from incremental.panoptic.update import package_extra

    old = ["circle", "square", "sky", "ground"]
    small = {**TINY, "n_layers": 1}
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=len(old), prompt_queries=2, **small)
    package = save_model(tmp_path / "base.pt", model, kind="panoptic", architecture="panoptic_tiny",
                         arch_kwargs=model.arch_kwargs(), class_names=old, extra=package_extra(old, [0, 1], 32))
    spec = SplitSpec(6, required=["cross"], n_required=(1, 2), others=["circle", "square"], n_other=(0, 2),
                     image_size=32, annotate=["cross"])
    data = generate_split(tmp_path / "data", "new", spec, seed=1).parent
    out = tmp_path / "updated"
    assert main(["update", "--model", str(package), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "query_groups" and any("query group" in n for n in report["notes"])
    updated = load_model(out / "model.pt")
    assert updated.arch_kwargs["prompt_groups"] == [1] and updated.class_names == [*old, "cross"]
    assert updated.arch_kwargs["prompt_thing_classes"] == [0, 1, 4]  # circle, square, cross
    rebuilt = updated.build()
    before = copy.deepcopy(model.state_dict())
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("scenario", ["3-2", "3-1-1"])
def test_the_benchmarks_query_groups_method_is_the_shipped_config(scenario, tmp_path):
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from panoptic_incremental import CONFIGS, load_config
    finally:
        sys.path.remove(str(root / "benchmarks"))
    from incremental.cli import prepare_run

    bench = load_config(CONFIGS[scenario], [], 0, "query_groups", tmp_path)
    _, shipped, _ = prepare_run(str(root / "configs" / f"panoptic_shapes_{scenario}_query_groups.yaml"), [])
    assert bench.model == shipped.model and bench.train == shipped.train
    assert bench.strategy.plugins == shipped.strategy.plugins == [] and bench.scenario.steps == shipped.scenario.steps

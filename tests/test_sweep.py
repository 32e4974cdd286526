"""The ablation runner: run planning, skip / resume / retry of run folders on two tiny real runs, the record
schema (checked against the config it came from), and the reports."""

import json
import math
import os
import statistics
import warnings

import pytest
import yaml
from PIL import Image

from sparse_detr.config import load_config, to_dict
from sparse_detr.engine.studies import sweep, sweep_plots, sweep_records
from sparse_detr.engine.training import train as train_mod
from sparse_detr.engine.studies.sweep_report import results_markdown
from sparse_detr.engine.studies.sweep_stats import summarize

TINY = {
    "model": {"backbone": "tiny_cnn", "num_classes": 6, "hidden_dim": 32, "nheads": 2, "num_feature_levels": 2,
              "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 32, "num_queries": 10, "with_box_refine": True,
              "two_stage": True, "eff_query_init": True, "eff_specific_head": True, "rho": 0.3,
              "use_enc_aux_loss": True, "scorer_target": "dam"},
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 6, "num_val": 2, "min_size": 64, "max_size": 64,
                                                   "preset": "cluttered", "max_objects": 4},
             "train_scales": [64], "max_size": 64, "val_size": 64, "crop": False, "num_workers": 0,
             "label_mapping": "contiguous"},
    "train": {"epochs": 1, "batch_size": 2, "log_every": 1, "eval_batch_size": 2, "vis_num_images": 0,
              "checkpoint_every_iters": 1},  # 3 iterations, a checkpoint after each
}


@pytest.fixture
def base(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _opts(base, tmp_path, **kw):
    return sweep.SweepOptions(base=base, out=str(tmp_path / "out"), bench_runs=1, extra={"bench_images": 1}, **kw)


def _tables(md: str) -> list[list[list[str]]]:
    """The markdown tables of `md` (runs of lines starting with "|"), each a list of rows of cells; asserts each is
    well formed: a delimiter row of "---" cells second, and every row as many cells as the header."""
    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append(block)
            block = []
    for table in tables:
        assert len(table) >= 2 and set(table[1]) == {"---"}, table[:2]
        assert {len(row) for row in table} == {len(table[0])}, table
    return tables


def _iterations(folder):
    its = []
    for line in open(os.path.join(folder, "log.jsonl")):
        entry = json.loads(line)
        if entry["type"] == "iter":
            its.append(entry["iteration"])
    return its


def test_plan_runs():
    runs = sweep.plan_runs(["dam@0.1,0.5", "os"], [0.1], [0, 1], dense=True)
    assert [r.name for r in runs] == ["dense_seed0", "dense_seed1", "dam_rho0.1_seed0", "dam_rho0.1_seed1",
                                      "dam_rho0.5_seed0", "dam_rho0.5_seed1", "os_rho0.1_seed0", "os_rho0.1_seed1"]
    dense = runs[0].overrides()
    assert "model.rho=0" in dense and "model.use_enc_aux_loss=false" in dense and "model.scorer_target=dam" in dense
    assert "model.scorer_target=os" in runs[-1].overrides() and "train.seed=1" in runs[-1].overrides()
    with pytest.raises(ValueError, match="--dense"):
        sweep.plan_runs(["dam"], [0.0], [0], dense=False)
    with pytest.raises(ValueError, match="repeats"):
        sweep.plan_runs(["dam"], [0.1, 0.1], [0], dense=False)
    with pytest.raises(ValueError, match="no ρ"):
        sweep.plan_runs(["dam"], [], [0], dense=False)
    variant, = sweep.plan_runs(["dam_aligned:dam:model.dam_alignment=aligned"], [0.1], [2], dense=False)
    assert variant.name == "dam_aligned_rho0.1_seed2"
    assert variant.overrides()[-2:] == ["model.scorer_target=dam", "model.dam_alignment=aligned"]
    with pytest.raises(ValueError, match="label:criterion"):
        sweep.plan_runs(["dam_aligned:dam:model.dam_alignment"], [0.1], [0], dense=False)


def test_train_seconds_counts_the_final_trajectory_once(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"type": "iter", "iteration": 1, "time": 1.0}, {"type": "iter", "iteration": 2, "time": 2.0},
             {"type": "checkpoint"}, {"type": "iter", "iteration": 2, "time": 4.0},  # redone after a resume
             {"type": "iter", "iteration": 3, "time": 8.0}]
    log.write_text("\n".join(map(json.dumps, lines)) + '\n{"type": "it')  # the last line cut by a kill
    assert sweep_records.train_seconds(str(log)) == (13.0, 3)


def test_skip_resume_retry_and_schema(base, tmp_path, monkeypatch):
    runs = sweep.plan_runs(["dam"], [0.3], [0], dense=True)
    opts = _opts(base, tmp_path)
    dam_dir = os.path.join(opts.out, "dam_rho0.3_seed0")

    # 1. The dam run is interrupted at its 2nd iteration (after the checkpoint of the 1st): a failed record.
    real_step = train_mod.Trainer.train_step

    def interrupted(self, *args, **kwargs):
        if self.train_cfg.output_dir == dam_dir and self.progress.iteration == 1:
            raise RuntimeError("simulated interruption")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.Trainer, "train_step", interrupted)
    first = sweep.run_sweep(runs, opts, log=lambda m: None)
    assert [r["status"] for r in first] == ["done", "failed"] and "simulated" in first[1]["error"]
    assert sweep.run_status(runs[1], opts)[0] == "resume"
    assert _iterations(dam_dir) == [1]

    # 2. Rerun: dense is skipped (not trained again), dam continues from iteration 1.
    monkeypatch.setattr(train_mod.Trainer, "train_step", real_step)
    trained = []
    real_run = train_mod.run
    monkeypatch.setattr(train_mod, "run", lambda cfg, **kw: trained.append(cfg.train.output_dir) or real_run(cfg, **kw))
    second = sweep.run_sweep(runs, opts, log=lambda m: None)
    assert trained == [dam_dir]
    assert _iterations(dam_dir) == [1, 2, 3]  # iteration 1 was not redone
    assert "resumed from" in open(os.path.join(dam_dir, "log.txt")).read()
    assert {k: v for k, v in second[0].items() if k != "resolved_config"} == \
        {k: v for k, v in first[0].items() if k != "resolved_config"}

    # 3. Everything finished: nothing trains, and the plots of the unchanged records are not redrawn.
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    drawn = []
    for name in ("plot_pareto", "plot_selection"):
        real_plot = getattr(sweep_plots, name)
        monkeypatch.setattr(sweep_plots, name, lambda *a, _real=real_plot, _n=name, **k: drawn.append(_n) or
                            _real(*a, **k))
    third = sweep.run_sweep(runs, opts, log=lambda m: None)
    assert [r["status"] for r in third] == ["done", "done"]
    assert drawn == []
    os.remove(os.path.join(opts.out, "results_selection.png"))
    sweep.write_results(third, opts)
    assert drawn == ["plot_selection"]  # a missing plot is drawn again

    # A finished record written before AP was in percent (COCO fractions, no "ap_unit") is reused in percent.
    old = {k: v for k, v in third[1].items() if k != "ap_unit"}
    old.update(AP=0.125, AP50=0.5, AP_s=None, evals=[{**e, "AP": 0.125, "AP50": 0.5} for e in old["evals"]])
    with open(os.path.join(dam_dir, "result.json"), "w") as f:
        json.dump(old, f)
    reread = sweep.run_sweep(runs, opts, log=lambda m: None)[1]
    assert (reread["AP"], reread["AP50"], reread["AP_s"], reread["ap_unit"]) == (12.5, 50.0, None, "percent")
    assert reread["evals"][-1]["AP"] == 12.5 and reread["selection"] == third[1]["selection"]
    assert json.load(open(os.path.join(opts.out, "results.json")))[1]["AP"] == 12.5
    assert "| dam_rho0.3_seed0 | 12.5 | 50.0 |" in open(os.path.join(opts.out, "results.md")).read()
    assert sorted(drawn[1:]) == ["plot_pareto", "plot_selection"]  # changed records: both plots drawn again

    # 4. A finished run is never reused for another config.
    with pytest.raises(sweep.ConfigChangedError, match="loss.cls_loss_coef"):
        sweep.run_sweep(runs, _opts(base, tmp_path, overrides=("loss.cls_loss_coef=3.0",)), log=lambda m: None)

    # The schema, against the configs the records name.
    records = json.load(open(os.path.join(opts.out, "results.json")))
    assert [r["name"] for r in records] == ["dense_seed0", "dam_rho0.3_seed0"]
    for spec, r in zip(runs, records):
        assert set(sweep_records.RECORD_KEYS) <= set(r) and "resolved_config" not in r
        assert (r["target"], r["rho"], r["seed"], r["status"]) == (spec.target, spec.rho, spec.seed, "done")
        for key in sweep_records.METRICS:
            assert r[key] is None or 0.0 <= r[key] <= 100.0, (key, r[key])
        assert r["ap_unit"] == "percent"
        assert r["AP50"] is not None  # the val split has objects
        assert 0 < r["encoder_gflops"] < r["gflops"] and r["cpu_fps"] > 0 and r["benchmark_hw"] == [64, 64]
        assert r["iterations"] == 3 and r["train_seconds"] > 0
        cfg = load_config(r["config"], r["overrides"])  # the record reproduces its run
        saved = json.load(open(os.path.join(r["output_dir"], "result.json")))["resolved_config"]
        assert to_dict(cfg) == saved
        assert (cfg.model.rho, cfg.train.seed) == (spec.rho, spec.seed)
    dense, dam = records
    assert dense["kept_tokens"] is None and dam["kept_tokens"] < dam["tokens"] == dense["tokens"]
    # The selection instruments: the dense run's at the reference budget, the sparse run's of its own kept set.
    assert dense["selection"]["dam_oracle"] > dense["selection"]["dam_random"] > 0
    assert "dam_coverage" not in dense["selection"] and "object_coverage" not in dense["selection"]
    assert 0 < dam["selection"]["dam_coverage"] <= dam["selection"]["dam_oracle"] + 1e-9
    assert 0 <= dam["selection"]["object_coverage"] <= 1
    for r in records:
        assert r["curves"]["iteration"] and r["evals"][-1]["iteration"] == 3 and r["device"] == "cpu"
        assert r["evals"][-1]["AP"] == pytest.approx(r["AP"])
    assert os.path.isfile(os.path.join(opts.out, "results_selection.png"))
    assert "| dam | 0.3 | 1 |" in open(os.path.join(opts.out, "results.md")).read().split("Selection instruments")[1]
    assert dam["encoder_gflops"] < dense["encoder_gflops"]
    md = open(os.path.join(opts.out, "results.md")).read()
    assert "dense_seed0" in md and "dam_rho0.3_seed0" in md
    assert len(_tables(md)) == 6  # summary, runs, paired, instruments, correlations, convergence: well formed
    with Image.open(os.path.join(opts.out, "results.png")) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_summary_is_mean_and_sample_std_over_seeds():
    recs = [{"target": "dam", "rho": 0.1, "seed": s, "status": "done", "AP": ap, "gflops": 2.0}
            for s, ap in enumerate([0.2, 0.4, 0.9])]
    recs.append({"target": "dam", "rho": 0.1, "seed": 9, "status": "failed"})  # left out
    (row,) = summarize(recs)
    assert row["seeds"] == [0, 1, 2]
    mean, std = row["AP"]
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2))
    assert row["gflops"] == (2.0, 0.0) and row["AP_l"] == (None, None)
    for r, seconds in zip(recs, (10990.4, 551.26, 12.34, None)):
        r.update(name=f"dam_seed{r['seed']}", config="c.yaml", train_seconds=seconds)
    runs = _tables(results_markdown(recs))[1]  # the per-run table: train s in plain digits
    assert [row[-2] for row in runs[2:]] == ["10990", "551", "12.3", "–"]


def test_parallel_jobs_cost_only(base, tmp_path):
    runs = sweep.plan_runs(["dam"], [0.3, 0.6], [0], dense=True)
    records = sweep.run_sweep(runs, _opts(base, tmp_path, train=False, jobs=2), log=lambda m: None)
    assert [r["name"] for r in records] == [r.name for r in runs]
    assert all(r["status"] == "cost" and r["fps_threads"] == 1 for r in records)  # single-threaded workers
    assert records[1]["encoder_gflops"] < records[2]["encoder_gflops"] < records[0]["encoder_gflops"]
    assert os.path.isfile(os.path.join(str(tmp_path / "out"), "results.png"))


def test_cli_arguments():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sweep_tool", os.path.join(os.path.dirname(__file__), "..", "tools", "sweep.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args(["--base", "b.yaml", "--dense", "--rho", "0.1", "--targets", "dam@0.1,0.5", "os",
                            "train.epochs=2", "--jobs", "2"])
    assert args.targets == ["dam@0.1,0.5", "os"] and args.overrides == ["train.epochs=2"] and args.jobs == 2
    with pytest.raises(SystemExit):
        tool.parse_args(["--base", "b.yaml", "--targets", "dam"])  # nothing to run


def test_pretrain_stage_is_shared_skipped_and_starts_every_run(base, tmp_path, monkeypatch):
    import torch

    pre = yaml.safe_load(open(base))
    pre["model"].update(rho=0.0, use_enc_aux_loss=False)
    pre["data"]["root"] = str(tmp_path / "data_pretrain")
    pre["data"]["synthetic"]["seed"] = 1
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    frozen = tmp_path / "frozen.yaml"  # the runs leave the backbone as loaded: it must be the pretrained one
    frozen.write_text(yaml.safe_dump({"_base_": os.path.basename(base), "train": {"lr_backbone": 0.0}}))
    opts = _opts(str(frozen), tmp_path, pretrain=str(tmp_path / "pre.yaml"))
    runs = sweep.plan_runs(["dam"], [0.3], [0], dense=False)  # one run: a second would only repeat it
    trained = []
    real_run = train_mod.run
    monkeypatch.setattr(train_mod, "run", lambda cfg, **kw: trained.append(cfg.train.output_dir) or real_run(cfg, **kw))
    records = sweep.run_sweep(runs, opts, log=lambda m: None)
    pre_dir = os.path.join(opts.out, "pretrain")
    assert trained == [pre_dir] + [os.path.join(opts.out, r.name) for r in runs]  # pretrained once, first
    backbone = torch.load(sweep.backbone_path(opts), weights_only=True)
    pretrained = torch.load(os.path.join(pre_dir, "checkpoint_last.pth"), weights_only=True)["model"]
    for r in records:
        assert r["status"] == "done" and f"model.pretrained_backbone={sweep.backbone_path(opts)}" in r["overrides"]
        final = torch.load(os.path.join(r["output_dir"], "checkpoint_last.pth"), weights_only=True)["model"]
        for k, v in backbone.items():
            assert torch.equal(final[f"backbone.0.body.{k}"], v) and torch.equal(pretrained[f"backbone.0.body.{k}"], v)
    meta = json.load(open(os.path.join(pre_dir, "result.json")))
    assert meta["iterations"] == 3 and 0 <= meta["AP50"] <= 100 and meta["backbone"] == sweep.backbone_path(opts)
    # Rerun: neither the pretraining nor a run trains again.
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: pytest.fail("trained again"))
    assert [r["status"] for r in sweep.run_sweep(runs, opts, log=lambda m: None)] == ["done"]
    # Lengthened into a new folder: the pretraining comes along (not trained again), the run continues.
    trained.clear()
    monkeypatch.setattr(train_mod, "run", lambda cfg, **kw: trained.append(cfg.train.output_dir) or real_run(cfg, **kw))
    longer = _opts(str(frozen), tmp_path / "long", pretrain=str(tmp_path / "pre.yaml"), lengthen=opts.out,
                   overrides=("train.epochs=2",))
    (record,) = sweep.run_sweep(runs, longer, log=lambda m: None)
    assert trained == [os.path.join(longer.out, runs[0].name)] and record["iterations"] == 6
    copied = torch.load(sweep.backbone_path(longer), weights_only=True)
    assert copied.keys() == backbone.keys() and all(torch.equal(copied[k], v) for k, v in backbone.items())
    # A changed pretraining config is refused, not reused.
    pre["loss"] = {"cls_loss_coef": 3.0}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    fresh = _opts(str(frozen), tmp_path / "x", pretrain=str(tmp_path / "pre.yaml"))
    os.makedirs(fresh.out)
    os.symlink(pre_dir, os.path.join(fresh.out, "pretrain"))
    with pytest.raises(sweep.ConfigChangedError, match="loss.cls_loss_coef"):
        sweep.run_sweep(runs, fresh, log=lambda m: None)


def test_paired_differences_pair_runs_by_seed():
    from sparse_detr.engine.studies.sweep_report import paired_markdown
    from sparse_detr.engine.studies.sweep_stats import paired_differences

    def rec(target, seed, ap, cov=None):
        return {"target": target, "rho": 0.1, "seed": seed, "status": "done", "AP": ap,
                "selection": {"dam_coverage": cov} if cov is not None else {}}

    records = [rec("dense", 0, 20.0), rec("dense", 1, 24.0), rec("dam", 0, 15.0, 0.3), rec("dam", 1, 17.0, 0.4),
               rec("dam", 2, 90.0), rec("random", 1, 18.0, 0.1)]  # AP in percent, instruments as fractions
    assert paired_differences(records, "dam", "dense") == pytest.approx([-5.0, -7.0])  # seed 2 has no pair
    assert paired_differences(records, "random", "dam") == pytest.approx([1.0])
    assert paired_differences(records, "random", "dam", "dam_coverage") == pytest.approx([-0.3])
    md = paired_markdown(records)
    assert "| dam − dense | 2 | -6.0 ± 1.4 | -5.0 -7.0 |" in md
    assert "| random − dam | 1 | +1.0 ± 0.0 | +1.0 |" in md


def test_an_unknown_criterion_stops_the_sweep_before_anything_trains(tmp_path):
    from sparse_detr.config import ConfigError

    base = "configs/demo_synthetic.yaml"
    runs = sweep.plan_runs(["dma"], [0.1], [0], dense=False)
    with pytest.raises(ConfigError, match="model.scorer_target: unknown token selection 'dma'"):
        sweep.run_sweep(runs, sweep.SweepOptions(base=base, out=str(tmp_path / "s")), log=lambda m: None)
    assert not (tmp_path / "s").exists()


def test_rank_correlations_against_scipy_and_by_hand():
    from scipy.stats import spearmanr

    from sparse_detr.engine.studies.sweep_report import correlation_markdown
    from sparse_detr.engine.studies.sweep_stats import rank_correlations

    aps = [0.20, 0.25, 0.18, 0.30, 0.25, 0.10]
    cover = [0.3, 0.5, 0.3, 0.9, 0.4, 0.1]  # ties in both columns
    records = [{"target": "x", "rho": 0.1, "seed": i, "status": "done", "AP": ap,
                "selection": {"dam_coverage": c, "object_coverage": 1 - c, "fg_precision": 0.5}}
               for i, (ap, c) in enumerate(zip(aps, cover))]
    records.append({"target": "dense", "rho": 0, "seed": 0, "status": "done", "AP": 0.9,
                    "selection": {"dam_coverage": 0.0}})  # dense runs are not ranked
    got = {r["key"]: r for r in rank_correlations(records)}
    assert got["dam_coverage"]["n"] == 6
    assert got["dam_coverage"]["rho"] == pytest.approx(spearmanr(aps, cover).statistic)
    assert got["object_coverage"]["rho"] == pytest.approx(-got["dam_coverage"]["rho"])
    assert got["fg_precision"]["rho"] is None and got["kept_share_l0"]["n"] == 0  # constant / missing
    # a strictly monotone pair by hand: rho = 1
    mono = [{"rho": 0.1, "status": "done", "AP": a, "selection": {"dam_coverage": a * a}} for a in (0.1, 0.3, 0.2)]
    assert rank_correlations(mono, ("dam_coverage",))[0]["rho"] == pytest.approx(1.0)
    md = correlation_markdown(records)
    assert f"| dam_coverage | 6 | {spearmanr(aps, cover).statistic:+.2f} |" in md and "| fg_precision | 6 | – |" in md


def test_convergence_compares_the_last_third_against_the_seed_spread():
    from sparse_detr.engine.studies.sweep_report import convergence_markdown
    from sparse_detr.engine.studies.sweep_stats import convergence

    def run(target, seed, aps):  # evaluations every 450 iterations; the last is the record's AP
        return {"target": target, "rho": 0.1, "seed": seed, "status": "done", "AP": aps[-1],
                "evals": [{"iteration": 450 * (i + 1), "AP": ap} for i, ap in enumerate(aps)]}

    # 8 evaluations to 3600: the last third starts at 2400, so 2700, 3150 and 3600 count, 2250 does not.
    records = [run("dense", 0, [5, 10, 15, 20, 25, 30.0, 30.5, 31.0]),
               run("dense", 1, [5, 10, 15, 20, 20, 34.0, 33.0, 33.5]),
               run("os", 0, [1, 2, 3, 4, 5, 20.0, 22.0, 24.0]), run("os", 1, [1, 2, 3, 4, 5, 21.0, 23.0, 25.0]),
               run("random", 0, [1, 2, 3, 4, 5, 6, 7, 8])]
    rows = {r["target"]: r for r in convergence(records)}
    dense, os_, random = rows["dense"], rows["os"], rows["random"]
    # Least squares by hand: seed 0 rises 1.0 over 2700..3600; seed 1 (34, 33, 33.5) falls 0.5; ranges 1.0, 1.0.
    assert dense["from_iteration"] == 2700 and dense["trends"] == pytest.approx([1.0, -0.5])
    assert dense["ranges"] == pytest.approx([1.0, 1.0]) and dense["trend"] == pytest.approx(0.25)
    assert dense["spread"] == pytest.approx(statistics.stdev([31.0, 33.5])) and dense["converged"] is True
    assert os_["trends"] == pytest.approx([4.0, 4.0]) and os_["converged"] is False  # spread 0.7
    assert random["spread"] is None and random["converged"] is None  # one seed: no spread to compare with
    # A boundary evaluation counts: to 2700 the last third starts at 1800 (in floats, (1 - 1/3) * 2700 > 1800).
    short = [run("dense", s, [5, 10, 15, 21.0 + s, 30.0, 35.0]) for s in (0, 1)]
    assert [r["from_iteration"] for r in convergence(short)] == [1800]
    md = convergence_markdown(records)
    assert len(_tables(md)) == 1
    assert "| dense | 0.1 | 2 | 2700 | +1.0 -0.5 | +0.2 | 1.0 | 1.8 | yes |" in md
    assert "| os | 0.1 | 2 | 2700 | +4.0 +4.0 | +4.0 | 4.0 | 0.7 | no |" in md


def test_saturation_fit_recovers_a_known_curve_and_projects_the_converged_schedule():
    import numpy as np

    from sparse_detr.engine.studies.sweep_stats import converged_schedule, convergence, saturation_fit

    plateau, gap, tau, t0 = 40.0, 6.0, 2000.0, 2700.0
    curve = lambda t: plateau - gap * math.exp(-(t - t0) / tau)  # noqa: E731
    iters = [2700 + 450 * i for i in range(7)]
    noise = np.random.default_rng(0).normal(0, 0.05, (3, len(iters)))
    points = [(t, curve(t) + noise[s, i]) for s in range(3) for i, t in enumerate(iters)]
    fit = saturation_fit(points)
    assert fit["plateau"] == pytest.approx(plateau, abs=0.3) and fit["tau"] == pytest.approx(tau, rel=0.1)
    assert fit["gap"] == pytest.approx(gap, rel=0.1) and fit["plateau_se"] < 0.5 and fit["located"]
    line = saturation_fit([(t, 20.0 + 0.001 * t) for t in iters])  # no bend: any plateau far off fits as well
    assert line is not None and not line["located"] and line["tau"] > 2 * (iters[-1] - iters[0])
    # The projection against a brute-force scan of the exact curve: the first T (step 1) whose last-third rise is
    # under the spread, scanning down from far out.
    exact = {"plateau": plateau, "gap": gap, "tau": tau, "t0": t0}
    for spread in (0.3, 1.0):
        rise = lambda T: curve(T) - curve(2 * T / 3)  # noqa: E731
        T = 200000
        while rise(T - 1) < spread:
            T -= 1
        assert converged_schedule(exact, spread) == pytest.approx(T, abs=1.0)
    assert converged_schedule(dict(exact, gap=-1.0), 0.3) is None  # a falling curve: nothing to project
    assert saturation_fit(points[:3]) is None  # 3 iterations: too few for 3 parameters

    runs = [{"target": "dense", "rho": 0.1, "seed": s, "status": "done", "AP": points[7 * s + 6][1],
             "evals": [{"iteration": 450 * (i + 1), "AP": 10.0 + i} for i in range(5)]
             + [{"iteration": t, "AP": ap} for t, ap in points[7 * s:7 * s + 7]]} for s in range(3)]
    row = convergence(runs)[0]  # the second half (from 2700 of 5400) is fitted, the early evaluations are not
    assert row["fit"]["plateau"] == pytest.approx(fit["plateau"]) and row["better_fit"] == "saturating"
    assert row["projected"] == pytest.approx(converged_schedule(row["fit"], row["spread"]))


def test_a_logarithmic_curve_is_told_apart_and_gets_no_projected_schedule():
    """AP = a + b·ln t never converges: its rise over the last third of any schedule is b·ln 1.5. On such points
    the log fit recovers a and b, the criterion prefers it, and no converged schedule is projected."""
    import numpy as np

    from sparse_detr.engine.studies.sweep_report import convergence_markdown
    from sparse_detr.engine.studies.sweep_stats import better_fit, convergence, log_fit, saturation_fit

    a, b = 10.0, 3.0
    curve = lambda t: a + b * math.log(t)  # noqa: E731
    iters = [4500 + 450 * i for i in range(18)]  # 4500 .. 12150: the second half of 8100 .. 12150 and more
    noise = np.random.default_rng(1).normal(0, 0.05, (3, len(iters)))
    points = [(t, curve(t) + noise[s, i]) for s in range(3) for i, t in enumerate(iters)]
    fit = log_fit(points)
    assert fit["a"] == pytest.approx(a, abs=0.3) and fit["b"] == pytest.approx(b, abs=0.05)
    assert better_fit(saturation_fit(points), fit) in ("log", "either")
    assert log_fit(points[:2]) is None  # 2 iterations: too few
    runs = [{"target": "dense", "rho": 0.1, "seed": s, "status": "done", "AP": points[18 * s + 17][1],
             "evals": [{"iteration": t, "AP": ap} for t, ap in points[18 * s:18 * s + 18]]} for s in range(3)]
    row = convergence(runs)[0]
    assert row["projected"] is None and row["better_fit"] in ("log", "either")
    # A straight line (one seed): the saturating fit has no bend to locate a plateau with, and the table says so
    # instead of printing the plateau at which the optimiser happened to stop.
    straight = [{"target": "dam", "rho": 0.1, "seed": 0, "status": "done", "AP": 26.0,
                 "evals": [{"iteration": t, "AP": 20.0 + 0.0005 * t} for t in iters]}]
    (row,) = convergence(straight)
    assert not row["fit"]["located"] and row["projected"] is None
    assert f"| not located | {row['fit']['tau']:.0f} |" in convergence_markdown(straight)
    for T in (12150.0, 1e6):  # the same rise over the last third, however long the schedule
        assert row["log_rise"] == pytest.approx(row["log_fit"]["b"] * (math.log(T) - math.log(2 * T / 3)))
        assert curve(T) - curve(2 * T / 3) == pytest.approx(b * math.log(1.5))
    # Exact points of each kind: each curve is told apart from the other.
    exact_sat = [(t, 40.0 - 6.0 * math.exp(-(t - 4500) / 1500)) for t in iters]
    exact_log = [(t, curve(t)) for t in iters]
    assert better_fit(saturation_fit(exact_sat), log_fit(exact_sat)) == "saturating"
    assert better_fit(saturation_fit(exact_log), log_fit(exact_log)) in ("log", "either")


def test_a_finished_sweep_is_lengthened_into_a_new_folder(base, tmp_path, monkeypatch):
    """--lengthen: each finished run continues from its last checkpoint to the new train.epochs in the new folder;
    the shorter sweep's files stay byte for byte; a run whose config differs in anything else is refused before
    anything is written."""
    runs = sweep.plan_runs(["dam"], [0.3], [0], dense=False)
    short = _opts(base, tmp_path)
    sweep.run_sweep(runs, short, log=lambda m: None)
    before = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
              for d, _, files in os.walk(short.out) for f in files}

    # Anything but train.epochs differs: refused, nothing written.
    other = sweep.SweepOptions(**{**short.__dict__, "out": str(tmp_path / "other"), "lengthen": short.out,
                                  "overrides": ("train.epochs=2", "loss.cls_loss_coef=3.0")})
    with pytest.raises(sweep.ConfigChangedError, match="loss.cls_loss_coef"):
        sweep.run_sweep(runs, other, log=lambda m: None)
    assert not os.path.exists(other.out)
    # An lr drop inside the epoch already trained would change the past: refused too.
    moved = sweep.SweepOptions(**{**other.__dict__, "overrides": ("train.epochs=2", "train.lr_drop_epochs=[0]")})
    with pytest.raises(sweep.ConfigChangedError, match="lr_drop_epochs"):
        sweep.run_sweep(runs, moved, log=lambda m: None)
    assert not os.path.exists(other.out)
    # A record without its checkpoints (as committed to a repository) is not seeded: that run trains anew.
    bare = tmp_path / "bare"
    os.makedirs(bare / runs[0].name)
    with open(os.path.join(short.out, runs[0].name, "result.json")) as f:
        (bare / runs[0].name / "result.json").write_text(f.read())
    assert sweep.lengthen_from(runs, sweep.SweepOptions(**{**short.__dict__, "out": str(tmp_path / "b"),
                                                           "lengthen": str(bare)})) == []
    assert not os.path.exists(tmp_path / "b")

    trained = []
    real_run = train_mod.run
    monkeypatch.setattr(train_mod, "run", lambda cfg, **kw: trained.append(kw.get("resume")) or real_run(cfg, **kw))
    # Lengthened with an lr drop after the shorter run's last epoch: the added epoch trains at the lower lr.
    longer = sweep.SweepOptions(**{**short.__dict__, "out": str(tmp_path / "longer"), "lengthen": short.out,
                                   "overrides": ("train.epochs=2", "train.lr_drop_epochs=[1]")})
    records = sweep.run_sweep(runs, longer, log=lambda m: None)
    assert trained == ["auto"] and [r["status"] for r in records] == ["done"]
    for r in records:  # iterations 1-3 are the shorter run's, 4-6 were trained here
        assert r["iterations"] == 6 and [e["iteration"] for e in r["evals"]] == [3, 6]
        assert _iterations(r["output_dir"]) == list(range(1, 7))
        assert "resumed from" in open(os.path.join(r["output_dir"], "log.txt")).read()
        lrs = {}
        for line in open(os.path.join(r["output_dir"], "log.jsonl")):
            entry = json.loads(line)
            if entry["type"] == "iter":
                lrs[entry["iteration"]] = entry["lr"]
        factor = load_config(r["config"], r["overrides"]).train.lr_drop_factor
        assert [lrs[i] for i in (4, 5, 6)] == pytest.approx([lrs[1] * factor] * 3) and lrs[3] == lrs[1]
    after = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
             for d, _, files in os.walk(short.out) for f in files}
    assert after == before


_STOP_SCRIPT = '''
import os, signal, sys, time
from sparse_detr.engine.cli import run_tool
from sparse_detr.engine.studies import sweep

OUT = sys.argv[1]


def fake_run_one(spec, opts):  # a training run as the trainer does it: SIGTERM -> finish the step, save, stop
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    open(os.path.join(OUT, spec.name + ".started"), "w").write(str(os.getpid()))
    while not stop:
        time.sleep(0.02)
    open(os.path.join(OUT, spec.name + ".saved"), "w").write("")
    raise KeyboardInterrupt("stopped by SIGTERM")


sweep.run_one = fake_run_one  # module level: the spawned workers run it too
if __name__ == "__main__":
    specs = [sweep.RunSpec("dam", 0.1, s) for s in range(4)]
    opts = sweep.SweepOptions(base="unused.yaml", out=OUT, train=True, jobs=2)
    finished = lambda record: open(os.path.join(OUT, record["name"] + ".record"), "w").write(record["status"])
    sys.exit(run_tool(lambda argv: sweep._run_parallel([(s, "new") for s in specs], opts, finished, print), []))
'''


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
@pytest.mark.parametrize("signame", ["SIGTERM"])  # SIGINT takes the same path (exit 130); 3.5 s more
def test_a_stopped_parallel_sweep_stops_and_saves_every_worker(tmp_path, signame):
    """Killing the sweep must not leave its workers training: each running run gets SIGTERM (the trainer saves and
    stops), no queued run starts, and the sweep exits 128 + the signal's number once they are gone."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "stop_sweep.py"
    script.write_text(_STOP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.started"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = sorted(out.glob("*.started"))
    assert len(started) == 2, proc.communicate(timeout=30)[0] if proc.poll() is not None else "workers did not start"
    workers = [int(p.read_text()) for p in started]
    signum = getattr(signal, signame)
    proc.send_signal(signum)
    try:
        output = proc.communicate(timeout=60)[0]
    finally:  # a failing sweep must not leave its workers running past the test
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, output
    assert "rerun the same command to resume" in output
    assert sorted(p.stem for p in out.glob("*.saved")) == sorted(p.stem for p in started)  # both saved
    assert len(list(out.glob("*.started"))) == 2  # the two queued runs never started
    assert not list(out.glob("*.record"))  # an interrupted run is not recorded as finished or failed
    time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)]


def test_selection_plot_draws_each_fitted_curve(tmp_path, monkeypatch):
    import matplotlib.figure
    import numpy as np

    from sparse_detr.engine.studies.sweep_plots import plot_selection
    from sparse_detr.engine.studies.sweep_stats import convergence

    iters = [450 * (i + 1) for i in range(12)]
    curves = {"iteration": [20, 40], **{k: [0.3, 0.32] for k in sweep_records.CURVE_KEYS}}
    records = [{"target": t, "rho": 0.1, "seed": s, "status": "done", "AP": top - 1, "curves": curves,
                "selection": {"dam_coverage": 0.3, "object_coverage": 0.9},
                "evals": [{"iteration": i, "AP": top - 12 * math.exp(-i / 1500) + 0.2 * s} for i in iters]}
               for t, top in (("dense", 40.0), ("dam", 25.0)) for s in (0, 1)]
    # A dense run measures no kept set: its coverage curves are None at every step (as in its log); a sparse run's
    # object coverage is None at a step whose batch has no box, here at one step of both seeds (the moving mean
    # spans the gap, the raw points of the unsmoothed AP-coverage panel leave it out).
    steps = list(range(20, 420, 20))
    records[0]["curves"] = records[1]["curves"] = {"iteration": steps, "dam_oracle": [0.5] * 20,
                                                   "dam_coverage": [None] * 20, "object_coverage": [None] * 20}
    records[2]["curves"] = records[3]["curves"] = {"iteration": steps, "dam_coverage": [0.3] * 20,
                                                   "object_coverage": [0.9] * 5 + [None] * 6 + [0.8] * 9}
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" from the unmeasured curves
        plot_selection(records, str(tmp_path / "sel.png"))
    coverage, objects = ([line.get_label() for line in saved[0].axes[i].get_lines()] for i in (0, 1))
    assert coverage == ["dense: DAM oracle at ρ=0.1 (n=2)", "dam (n=2)"] and objects == ["dam (n=2)"]
    x, y = saved[0].axes[1].get_lines()[0].get_data()  # windows of 5 steps, those with a measured point only
    assert list(x) == steps[4:9] + steps[11:] and list(y) == pytest.approx([0.9] * 5 + [0.8] * 9)
    ap_axes = saved[0].axes[2]
    dashed = [line for line in ap_axes.get_lines() if line.get_linestyle() == "--"]
    fits = {r["target"]: r["fit"] for r in convergence(records)}
    assert len(dashed) == 2  # one per target, drawn from the fit over the second half (2700 .. 5400)
    for line, target in zip(dashed, ("dense", "dam")):
        x, y = line.get_xdata(), line.get_ydata()
        assert x[0] == pytest.approx(2700) and x[-1] == pytest.approx(5400)
        fit = fits[target]
        assert y[-1] == pytest.approx(fit["plateau"] - fit["gap"] * np.exp(-(5400 - fit["t0"]) / fit["tau"]))
        assert y[-1] == pytest.approx(({"dense": 40.0, "dam": 25.0}[target] + 0.1 - 12 * math.exp(-5400 / 1500)),
                                      abs=0.05)

"""examples/train_moe_lm.py on the CPU at a tiny size: a run paused at --stop-at and continued with
--resume gives the same losses, bit for bit, as one uninterrupted run (what a multi-call GPU
convergence run relies on), and the report reads the result."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
fp8flow = pytest.importorskip("fp8flow")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "examples", "train_moe_lm.py")
TINY = ["--device", "cpu", "--layers", "1", "--hidden", "256", "--heads", "2", "--seq", "32",
        "--batch", "2", "--experts", "4", "--top-k", "2", "--ffn", "256", "--warmup", "4",
        "--calib-steps", "2", "--val-batches", "1", "--log-every", "100", "--steps", "10"]


def run(*args):
    # The example must import the fp8flow this test imported (pip-installed, or built in place in
    # python/): putting python/ first whatever the install shadowed an installed extension with
    # the source tree, which has no _C (ImportError on the GPU machine, session 6).
    where = os.path.dirname(os.path.dirname(os.path.abspath(fp8flow.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [where] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def losses(out, recipe):
    with open(os.path.join(out, f"loss_{recipe}.csv")) as f:
        next(f)
        return [(int(r.split(",")[0]), r.split(",")[1]) for r in f if r.strip()]


@pytest.mark.parametrize("recipe", ["fp8-flow"])
def test_pause_and_resume_equals_one_run(tmp_path, recipe):
    one, two, ck = tmp_path / "one", tmp_path / "two", tmp_path / "ck"
    run(*TINY, "--recipe", recipe, "--out", str(one))
    first = run(*TINY, "--recipe", recipe, "--out", str(two), "--ckpt", str(ck), "--stop-at", "6")
    assert "stopped at step 6" in first and (ck / f"ckpt_{recipe}.pt").exists()
    second = run(*TINY, "--recipe", recipe, "--out", str(two), "--ckpt", str(ck), "--resume")
    assert "resumed from" in second
    a, b = losses(one, recipe), losses(two, recipe)
    assert [s for s, _ in a] == list(range(10)) and [s for s, _ in b] == list(range(10))
    assert a == b  # the same printed losses (6 decimals) at every step
    done = run(*TINY, "--recipe", recipe, "--out", str(two), "--ckpt", str(ck), "--resume")
    assert "resumed from" in done and losses(two, recipe) == b  # a finished run resumes as a no-op
    with pytest.raises(AssertionError, match="no checkpoint"):
        run(*TINY, "--recipe", recipe, "--out", str(tmp_path / "x"), "--ckpt", str(tmp_path / "none"),
            "--resume")


def test_named_control_run_differs_only_by_its_nudge(tmp_path):
    # --name keeps a control run's files apart from its recipe's main run in one --out; the
    # --init-perturb run starts from nudged weights (first loss differs, slightly), and a rerun of
    # the same arguments is the same run (the CPU backend is deterministic).
    out = str(tmp_path)
    run(*TINY, "--recipe", "bf16", "--out", out)
    log = run(*TINY, "--recipe", "bf16", "--name", "bf16-nudged", "--init-perturb", "1e-3",
              "--out", out)
    assert "initial weights scaled by 1 + 0.001" in log
    assert os.path.exists(os.path.join(out, "summary_bf16-nudged.json"))
    main, nudged = losses(out, "bf16"), losses(out, "bf16-nudged")
    assert [s for s, _ in main] == [s for s, _ in nudged] == list(range(10))
    l0, n0 = float(main[0][1]), float(nudged[0][1])
    assert l0 != n0 and abs(n0 / l0 - 1) < 1e-2
    run(*TINY, "--recipe", "bf16", "--name", "bf16-again", "--out", out)
    assert losses(out, "bf16-again") == main


def write_run(out, recipe, loss, val, steps=200, name=None):
    with open(os.path.join(out, f"loss_{name or recipe}.csv"), "w") as f:
        f.write("step,loss\n" + "".join(f"{i},{loss:.6f}\n" for i in range(steps)))
    name = name or recipe
    with open(os.path.join(out, f"summary_{name}.json"), "w") as f:
        f.write(f'{{"recipe": "{recipe}", "name": "{name}", "status": "ok", "steps_done": {steps}, '
                f'"nan_step": null, "val_loss": {val}}}')


def test_report_reads_both_acceptance_criteria(tmp_path):
    # Only the report (no training): a run 0.5% below bf16 fails |d| < 0.25% and passes the one-sided
    # reading; 0.1% above passes both; 0.3% above fails both. Validation differences are printed.
    out = str(tmp_path)
    write_run(out, "bf16", 1.0, 2.0)
    write_run(out, "fp8-flow", 0.995, 1.99)
    write_run(out, "fp8-flow-mxfp4", 1.001, 2.006)
    text = run("--report", out)
    assert "- acceptance fp8-flow: FAIL (one-sided: PASS)" in text
    assert "- acceptance fp8-flow-mxfp4: PASS (one-sided: PASS)" in text
    row = next(line for line in text.splitlines() if line.startswith("| fp8-flow |"))
    assert "-0.500%" in row and "| NO | yes |" in row and "-0.500%" in row.split("1.9900")[1]
    write_run(out, "fp8-flow-mxfp4", 1.003, 2.0)
    assert "- acceptance fp8-flow-mxfp4: FAIL (one-sided: FAIL)" in run("--report", out)


def test_report_noise_floor_of_bf16_controls(tmp_path):
    # bf16 control runs under other names set the spread two runs of one recipe reach; the report
    # says whether each FP8 recipe's difference lies inside it.
    out = str(tmp_path)
    write_run(out, "bf16", 1.0, 2.0)
    write_run(out, "bf16", 0.996, 1.99, name="bf16-nudge1")
    write_run(out, "bf16", 1.002, 2.004, name="bf16-nudge2")
    write_run(out, "fp8-flow", 0.995, 1.99)
    write_run(out, "fp8-flow-mxfp4", 0.997, 2.0)
    text = run("--report", out)
    assert "| bf16-nudge1 |" in text and "| bf16-nudge2 |" in text
    assert ("- noise floor: 2 bf16 control run(s) (bf16-nudge1, bf16-nudge2) end at -0.400%, +0.200% "
            "of bf16 (largest |difference| 0.400%; validation 0.500%)") in text
    assert "- fp8-flow: |difference| 0.500% is outside the bf16 controls' spread" in text
    assert "- fp8-flow-mxfp4: |difference| 0.300% is inside the bf16 controls' spread" in text
    # bf16's mean over its three runs: 0.99933 (std 0.306%), validation 1.998.
    assert "- bf16 as the mean of its 3 runs: final loss 0.9993 (run-to-run std 0.306%), validation 1.9980" in text
    assert "- acceptance fp8-flow vs the bf16 mean: -0.434%, validation -0.400%: FAIL" in text
    assert "- acceptance fp8-flow-mxfp4 vs the bf16 mean: -0.233%, validation +0.100%: PASS" in text

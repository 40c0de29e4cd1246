"""bench/gpu_suite.py: its plan, its bookkeeping with stand-in benches (failures, timeouts, the files after each
entry), and a CPU dry run of a subset of the real benches through the command line."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_suite.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = _load("bench_gpu_suite", SCRIPT)


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def entry(name: str, code: str, limit_s: float):
    return suite.Entry(name, f"stand-in {name}", python(code), f"python -c <{name}>", limit_s, f"measures {name}")


def quiet(_line: str) -> None:
    pass


def dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# ------------------------------------------------------------------------------------------ the plan
def test_gpu_plan_covers_every_benchmark_within_eight_minutes():
    entries = suite.plan()
    assert [e.name for e in entries] == suite.NAMES
    assert len(set(suite.NAMES)) == len(suite.NAMES) == 11
    assert sum(e.limit_s for e in entries) <= 465  # < 8 minutes with the suite's start-up and the last kill
    assert all(e.limit_s >= 20 for e in entries)
    commands = {e.name: e.display for e in entries}
    scripts = {e.name: Path(e.command[1]).name for e in entries}
    cpu_only = {"bench_predict_resume.py"}  # several CPU processes on one machine, killed and resumed
    assert set(scripts.values()) == {p.name for p in (REPO / "bench").glob("bench_*.py")} - cpu_only  # every bench runs
    assert "--quick" not in " ".join(commands.values())
    assert "--batch 2" in commands["masking_overhead"]
    assert "--batches 2 " in commands["training_throughput_b2"] and "--batches 8 " in commands["training_throughput_b8"]
    assert "--sizes 448 --mask-counts 5 100" in commands["maskinversion"]
    assert "--size 448 --batch 32" in commands["gem"]
    assert "--model sd21-base --dtype bfloat16" in commands["invseg"]
    assert "--cuda-iterations 10" in commands["mimic"]
    assert "--cuda-only" in commands["importance_prior"]
    assert "--batches 2 4 8" in commands["finetune_memory"]


def test_dry_plan_appends_smaller_sizes_to_the_gpu_arguments():
    gpu = {e.name: e for e in suite.plan()}
    for dry in suite.plan(dry_run=True):
        gpu_args = gpu[dry.name].command[2:]
        assert dry.command[2:2 + len(gpu_args)] == gpu_args  # the GPU arguments are parsed in a dry run too
        assert "--quick" in dry.command[2 + len(gpu_args):]
    assert [e.name for e in suite.plan(["gem", "invseg"], dry_run=True)] == ["gem", "invseg"]  # the suite's order


def test_invseg_entry_has_stable_diffusion_2_1_base_sizes():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from grounding.models.stable_diffusion import TINY_TEXT_CONFIG

    bench = _load("bench_invseg_capture_under_test", REPO / "bench" / "bench_invseg_capture.py")
    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel(**bench.SD21_BASE_UNET)
        vae = AutoencoderKL(**bench.SD21_BASE_VAE)
        text = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, **bench.SD21_BASE_TEXT}, vocab_size=49408))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [865_910_724, 83_653_863, 340_387_840]  # stabilityai/stable-diffusion-2-1-base's


def test_unknown_entry_is_rejected_by_the_command_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "gem", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr


# ------------------------------------------------------------------------------------------ bookkeeping
def test_keeps_what_finished_and_rewrites_valid_files_after_each_entry(tmp_path):
    out = tmp_path / "results" / "suite.json"
    hang = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('grandchild', child.pid, flush=True)\n"
            "print('{\"so_far\": 2}', flush=True)\n"
            "time.sleep(60)")
    reader = ("import json, re\n"
              f"document = json.load(open({str(out)!r}))\n"
              f"sections = re.findall(r'^### (\\w+):', open({str(out.with_suffix('.md'))!r}).read(), re.M)\n"
              "print(json.dumps({'seen': {k: r['status'] for k, r in document['benches'].items()}, 'sections': sections,"
              " 'first': document['benches']['first'].get('figures')}))")
    entries = [
        entry("hang", hang, 2),
        entry("first", "print('a progress line'); print('{\"value\": 1.5, \"name\": \"x|y\"}')", 60),
        entry("crash", "import sys; print('partial', flush=True); sys.stderr.write('line 1\\nboom: it broke\\n');"
                       " sys.exit(3)", 60),
        entry("silent", "print('no figures here')", 60),
        entry("reader", reader, 60),
    ]
    lines: list[str] = []
    start = time.monotonic()
    document = suite.run_suite(entries, out, mode="dry-run", info={"gpu": None}, emit=lines.append, progress=quiet)
    assert time.monotonic() - start < 40

    benches = document["benches"]
    assert list(benches) == ["hang", "first", "crash", "silent", "reader"]
    assert benches["hang"]["status"] == "timeout" and benches["hang"]["seconds"] < 15
    assert benches["hang"]["partial_figures"] == {"so_far": 2} and "figures" not in benches["hang"]
    pid = int(benches["hang"]["stdout_tail"][0].split()[1])
    for _ in range(50):  # the process group went with it
        if dead(pid):
            break
        time.sleep(0.1)
    assert dead(pid)
    assert benches["first"]["status"] == "ok" and benches["first"]["figures"] == {"value": 1.5, "name": "x|y"}
    assert benches["crash"]["status"] == "failed" and benches["crash"]["returncode"] == 3
    assert benches["crash"]["stderr_tail"] == ["line 1", "boom: it broke"]
    assert benches["crash"]["stdout_tail"] == ["partial"] and "figures" not in benches["crash"]
    assert benches["silent"]["status"] == "failed" and "no JSON line" in benches["silent"]["error"]
    # the last bench read both files as they stood before it ran: valid, with every earlier entry's outcome
    seen = benches["reader"]["figures"]
    assert seen["seen"] == {"hang": "timeout", "first": "ok", "crash": "failed", "silent": "failed", "reader": "running"}
    assert seen["sections"] == ["hang", "first", "crash", "silent", "reader"]
    assert seen["first"] == {"value": 1.5, "name": "x|y"}

    # stdout: one JSON line per entry, then the summary
    parsed = [json.loads(line) for line in lines]
    assert [p.get("bench") for p in parsed] == ["hang", "first", "crash", "silent", "reader", None]
    assert parsed[1]["figures"] == {"value": 1.5, "name": "x|y"}
    assert parsed[2]["returncode"] == 3 and parsed[2]["status"] == "failed"
    summary = parsed[-1]
    assert summary["ok"] == ["first", "reader"] and summary["failed"] == ["crash", "silent"]
    assert summary["timeout"] == ["hang"] and summary["json"] == str(out)

    on_disk = json.loads(out.read_text())
    assert on_disk["benches"] == benches and on_disk["finished"]
    assert not [p for p in out.parent.iterdir() if p.name not in ("suite.json", "suite.md")]  # no temporary left
    markdown = out.with_suffix(".md").read_text()
    assert "| value | 1.5 |" in markdown and "x\\|y" in markdown  # a | in a value does not break the table
    assert "boom: it broke" in markdown and "**timeout**" in markdown and "**failed** in" in markdown
    assert "before it stopped (partial):" in markdown and "| so_far | 2 |" in markdown


def test_unused_time_passes_on_and_an_exhausted_budget_skips(tmp_path):
    entries = [
        entry("slow", "import time; time.sleep(30)", 2),       # times out at 2 s
        entry("starved", "print('{\"x\": 1}')", 0.5),          # its deadline (2.5 s) has nearly passed
        entry("quick", "print('{\"x\": 2}')", 10),
        entry("late", "import time; time.sleep(3); print('{\"x\": 3}')", 1),  # needs what 'quick' left
    ]
    document = suite.run_suite(entries, tmp_path / "s.json", emit=quiet, progress=quiet)
    benches = document["benches"]
    assert [benches[n]["status"] for n in ("slow", "starved", "quick", "late")] == ["timeout", "skipped", "ok", "ok"]
    assert benches["late"]["allowed_s"] > 5 and benches["late"]["figures"] == {"x": 3}
    assert document["seconds"] < sum(e.limit_s for e in entries)  # never past the sum of the limits


# ------------------------------------------------------------------------------------------ the command line
@pytest.mark.slow
def test_dry_run_of_a_subset_through_the_command_line(tmp_path):
    """A dry run of two real benches (the full dry run takes about 3 minutes on 2 cores): importance_prior and
    mimic, given in the reverse of the suite's order."""
    subset = ["importance_prior", "mimic"]
    out = tmp_path / "gpu" / "suite.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", *subset, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    order = ["mimic", "importance_prior"]  # the suite's order, not the command line's
    assert [line.get("bench") for line in lines] == [*order, None]
    summary = lines[-1]
    assert summary["mode"] == "dry-run" and summary["ok"] == order and summary["failed"] == summary["timeout"] == []
    assert summary["json"] == str(out) and summary["markdown"] == str(out.with_suffix(".md"))

    document = json.loads(out.read_text())
    assert document["mode"] == "dry-run" and document["machine"]["gpu"] is None and document["finished"]
    assert document["command"].endswith(f"--out {out}")
    assert list(document["benches"]) == order
    figures = {line["bench"]: line["figures"] for line in lines[:-1]}
    for name in order:
        assert document["benches"][name]["status"] == "ok"
        assert document["benches"][name]["figures"] == figures[name]
    # the dry sizes won over the GPU arguments before them (the last value of an option counts)
    prior = figures["importance_prior"]
    assert prior["grid"] == [25, 42] and prior["tokens"] == 25 * 42 and prior["ms_chunked"] > 0
    assert "cuda_ms_chunked" not in prior and prior["peak_mb_pooled"] >= 0
    mimic = figures["mimic"]
    assert mimic["repeats"] == 2 and mimic["step_ms"] > 0 and "cuda_7b_s_per_iter" not in mimic
    assert {f"{term}_share" for term in ("sce", "base", "bn", "patch", "tv", "l2")} <= set(mimic)

    markdown = out.with_suffix(".md").read_text()
    assert "CPU dry run" in markdown
    for name in order:
        assert f"### {name}: " in markdown and document["benches"][name]["command"] in markdown
    assert "| step_ms |" in markdown and "| ms_chunked |" in markdown

"""torchrun sharding (code_edit.distributed): 2 processes on the tiny model merge to the same
metrics as 1 process (sequential and batch mode); a 2-process run killed mid-way is finished by a
1-process resume with every case exactly once; rank 0's start errors stop every rank; the pure parts
(shard, journal merge, device choice) against hand-built cases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import code_edit.run_folder as F
from code_edit.distributed import Ranks, env_ranks, rank_device, shard
from test_editor_fixtures import cli_args, write_hparams

REPO = Path(__file__).resolve().parent.parent


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def deterministic(records):
    """Records without what any two runs measure differently: `time` and `stages` (wall seconds, peak
    GPU memory) and every `seconds` inside edit_stats. Everything else must match exactly."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return [strip({k: v for k, v in r.items() if k not in ("time", "stages")}) for r in records]


def the_run_dir(root, method="LoRA"):
    tag = "T0_S1" if method == "CausalEdit" else "default"
    (d,) = (Path(root) / "handmade" / "test-tiny" / method / f"tag-{tag}").glob("n*_seed70_*")
    return d


def rank_env(tmp_path) -> dict:
    """The environment of a rank: one thread, tracebacks on fatal signals, the test's cache, the repo
    importable, and no torchrun variables left over from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "CODE_EDIT_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def torchrun(tmp_path, target, args, nproc=2):
    """`python -m torch.distributed.run --standalone` (a free rendezvous port) with one thread per rank."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *target, *args], cwd=REPO, env=rank_env(tmp_path), capture_output=True,
                          text=True, timeout=300)


def one_process(tmp_path, args):
    """Plain `python -m code_edit` in a subprocess with the environment of a torchrun rank."""
    return subprocess.run([sys.executable, "-m", "code_edit", *args], cwd=REPO, env=rank_env(tmp_path),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs of the commands the tests shard: LoRA sequential 4 cases and batch mode with 2
    groups; CausalEdit sequential 4 cases (cases 1 and 3 share an edit: the bootstrap cache is in play)."""
    out = {}
    for name, method, extra in MODES:
        tmp = tmp_path_factory.mktemp(f"ref-{name}")
        proc = one_process(tmp, cli_args(tmp, method, "--run_id", "r", *extra, max_cases=4))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = the_run_dir(tmp / "out", method)
    return out


MODES = [("seq", "LoRA", []), ("batch", "LoRA", ["--batch_edit", "2"]), ("causal", "CausalEdit", [])]


@pytest.mark.parametrize("mode, method, extra", MODES)
def test_two_ranks_merge_to_the_one_process_result(tmp_path, reference, mode, method, extra):
    proc = torchrun(tmp_path, ["-m", "code_edit"], cli_args(tmp_path, method, "--run_id", "r", *extra, max_cases=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d, ref = the_run_dir(tmp_path / "out", method), reference[mode]
    assert d.name == ref.name
    got, want = json.loads((d / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text())
    assert [(r["unit"], r["case_id"]) for r in got] == [(r["unit"], r["case_id"]) for r in want]  # documented order
    assert deterministic(got) == deterministic(want)
    assert json.loads((d / "res.json").read_text()) == json.loads((ref / "res.json").read_text())
    # unit i went to rank i % 2, each into its own journal; no one-process journal was written
    units = [u["unit"] for u in json.loads((d / "requests.json").read_text())]
    assert len(units) == (2 if mode == "batch" else 4)
    n_cases = {u: sum(r["unit"] == u for r in got) for u in units}
    for r in (0, 1):
        assert [row["unit"] for row in jsonl(d / f"metrics.rank{r}.jsonl")] == \
            [u for u in units[r::2] for _ in range(n_cases[u])]
    assert not (d / "metrics.jsonl").exists() and (d / "run.rank1.log").exists()
    info = json.loads((d / "meta" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 2 and info["units_done"] == len(units)
    assert f"{method}: 4 cases" in proc.stdout  # rank 0's summary table (batch mode: case 3 is evaluated twice)


HOOK = """
import os, signal, sys, time
import code_edit.run_folder as F
real = F.Journal.append
def append(self, unit, records):
    real(self, unit, records)
    # wait until both ranks have journaled their first unit: the cut is the same every time
    while not all((self.path.parent / f"metrics.rank{r}.jsonl").exists() for r in (0, 1)):
        time.sleep(0.05)
    torn = self.path.parent / "torn.written"
    if os.environ["RANK"] == "1":  # and rank 1 dies in the middle of writing a line
        with open(self.path, "a") as f:
            f.write('{"unit": "case-999", "case_id": 999, "rec')
        torn.touch()
    else:  # rank 0 dies only after that: torchrun stops the other rank once one is gone
        end = time.monotonic() + 60
        while not torn.exists() and time.monotonic() < end:
            time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
F.Journal.append = append
from code_edit.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_two_rank_run_resumed_by_one_process(tmp_path, reference):
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    args = cli_args(tmp_path, "LoRA", max_cases=4)  # no --run_id: the resume finds the run by its settings
    proc = torchrun(tmp_path, [str(hook)], args)
    assert proc.returncode != 0
    d = the_run_dir(tmp_path / "out")
    units = [u["unit"] for u in json.loads((d / "requests.json").read_text())]
    assert (d / "metrics.rank0.jsonl").read_text().count("\n") == 1
    assert not (d / "metrics.rank1.jsonl").read_text().endswith("\n")  # the torn line is there
    assert json.loads((d / "meta" / "run_info.json").read_text())["status"] == "running"

    proc = one_process(tmp_path, args)  # one process, a different world size: the same run is resumed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 2/4 units finished, 2 to go" in proc.stderr
    assert the_run_dir(tmp_path / "out") == d
    # units 0 and 1 were journaled by ranks 0 and 1 before the kill; the resume edited exactly the other two
    journals = {name: jsonl(d / name) for name in ("metrics.rank0.jsonl", "metrics.rank1.jsonl", "metrics.jsonl")}
    assert [[r["unit"] for r in rows] for rows in journals.values()] == [[units[0]], [units[1]], units[2:]]
    assert sorted(r["case_id"] for rows in journals.values() for r in rows) == [1, 2, 3, 4]  # each exactly once
    got = json.loads((d / "metrics.json").read_text())
    want = json.loads((reference["seq"] / "metrics.json").read_text())
    assert deterministic(got) == deterministic(want)
    info = json.loads((d / "meta" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 1 and info["units_done"] == 4

    # rank 0 cannot start (other hparams under the same run id): every rank stops with the reason, no hang
    write_hparams(tmp_path, 'extends = "tiny"\n[eval]\nmax_new_tokens = 5\n')
    proc = torchrun(tmp_path, ["-m", "code_edit"], args + ["--run_id", d.name.split("_seed70_")[1]])
    assert proc.returncode != 0
    assert "hparams differ" in proc.stderr and "rank 0 could not start the run" in proc.stderr


def test_shard_is_round_robin_and_exact():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(x for p in parts for x in p) == items
    assert shard(items, 0, 1) == items and shard([1], 1, 2) == []


def test_journal_merge_takes_each_unit_whole_from_one_journal(tmp_path):
    a = {"case_id": 1}
    b, c = {"case_id": 2}, {"case_id": 3}
    units = [F.Unit("case-1", (), (a,)), F.Unit("group-2", (), (b, c), 2), F.Unit("case-4", (), ({"case_id": 4},))]

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps({"unit": u, "case_id": i, "record": {"v": v}}) + "\n"
                                             for u, i, v in rows))

    write("metrics.jsonl", [("case-1", 1, "one-process"), ("group-2", 2, "old-partial")])  # group-2 cut short
    write("metrics.rank1.jsonl", [("group-2", 2, "new"), ("group-2", 3, "new")])
    write("metrics.rank10.jsonl", [("case-4", 4, "r10")])
    write("metrics.rank2.jsonl", [("group-2", 3, "partial-again")])  # incomplete here: never mixed in
    (tmp_path / "metrics.rankX.jsonl").write_text("")  # not a journal name
    assert [p.name for p in F.journal_paths(tmp_path)] == ["metrics.jsonl", "metrics.rank1.jsonl",
                                                          "metrics.rank2.jsonl", "metrics.rank10.jsonl"]
    rows = F.journal_rows(tmp_path, units)
    assert rows == {("case-1", 1): {"v": "one-process"}, ("group-2", 2): {"v": "new"}, ("group-2", 3): {"v": "new"},
                    ("case-4", 4): {"v": "r10"}}
    assert F.done_units(units, rows) == {"case-1", "group-2", "case-4"}
    assert F.journal_rows(tmp_path, units[:1]) == {("case-1", 1): {"v": "one-process"}}
    assert F.journal_name(Ranks()) == "metrics.jsonl" and F.journal_name(Ranks(3, 4, 1)) == "metrics.rank3.jsonl"


def test_ranks_and_devices_from_torchrun_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert env_ranks() == Ranks(0, 1, 0)  # plain python -m code_edit
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_ranks() == Ranks(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_ranks() == Ranks(3, 4, 1)
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="RANK"):
        env_ranks()
    assert str(rank_device("cpu", Ranks(3, 4, 1))) == "cpu"  # ranks share the CPU
    assert str(rank_device("cuda:0", Ranks(0, 1, 0))) == "cuda:0"  # one process: as asked
    import torch

    if torch.cuda.device_count() < 2:  # plain cuda with several ranks means cuda:LOCAL_RANK, which must exist
        with pytest.raises(ValueError, match="LOCAL_RANK 5 but .* CUDA device"):
            rank_device("cuda", Ranks(5, 8, 5))


def test_reproduce_launches_torchrun_and_finds_the_run_dir(tmp_path, reference):
    import importlib.util

    from code_edit.__main__ import build_parser

    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    argv = cli_args(reference["seq"].parents[5], "LoRA", "--run_id", "r", max_cases=4)
    assert rep.launch_command(3, argv) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc_per_node", "3", "-m", "code_edit", *argv]
    # where the torchrun-launched run wrote: the folder a one-process execute() returned for the same command
    assert rep.run_dir_of(build_parser().parse_args(argv)) == reference["seq"]

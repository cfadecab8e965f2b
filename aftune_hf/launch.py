"""Verify a trace with several processes: ``accelerate launch`` splits the challenged windows.

Installed with the package: ``accelerate launch -m aftune_hf.launch ...`` (``scripts/verify.py`` is
the same entry point as a file, for launchers that want a path).

    # two CPU processes (gloo). Note: `--cpu --num_processes 2` would start only ONE process.
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m aftune_hf.launch TRACE --contract FILE \\
        --nonce HEX [--windows N] [--model PATH] [--report FILE.json] [--num-processes 2]

    # GPUs: accelerate launch --num_processes 8 -m aftune_hf.launch TRACE --contract FILE ...

Every process derives the same windows from (trace root, nonce); each re-executes its share
in a child process of its own (a replay is a one-process Trainer run and must not join the
launcher's process group); the main process gathers the shard reports and writes one report.

A trace recorded by ``world_size`` > 1 processes in exact mode is replayed as it was recorded:
launch exactly ``world_size`` processes; they re-execute every challenged window *together*, as
DDP (or as FSDP2 ranks, for an FSDP trace: each resumes its rows of the anchor and the state
digests are joined from the ranks' shard pieces), each gathering every rank's micro-batches as the
recorder did, while the main process runs the structural and data checks in a child process.
TRACE may be ``hf://REPO@SHA``: every process downloads that pinned revision into a private
directory first, and the shards verify that copy (the report names the ``hf://`` source). The main
process checks that the shards together replayed exactly the challenged windows (else ERROR).
Exit codes as ``aftune verify``: 0 PASS, 1 FAIL, 2 ERROR or usage error, 3 INCONCLUSIVE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from accelerate import PartialState

from .contract import Contract, load_contract
from .dist import all_gather_bytes
from .errors import AftuneError, ProviderFault
from .replay import sanitized_env
from .report import ERROR, FAIL, PASS, VerificationReport, merge_reports, report_from_json
from .trace import Integrity, TraceReader
from .verify import Challenge, check_windows, environment_error, make_challenge, window_failures
from .verify.env import adopt_environment
from .cliargs import positive_int


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--contract", required=True)
    ap.add_argument("--nonce", help="hex; drawn by the main process when absent")
    ap.add_argument("--windows", type=positive_int)
    ap.add_argument("--model")
    ap.add_argument("--report")
    ap.add_argument("--signer", help="the provider's pinned public key (PEM): the trace's signed root must match")
    ap.add_argument("--endpoint", help="Hub URL for hf:// traces (default: HF_ENDPOINT or huggingface.co)")
    ap.add_argument("--num-processes", type=int, help="refuse to run unless exactly this many processes started")
    ap.add_argument("--exit-file", help="write the verdict's exit code here and exit 0 in every process "
                    "(what `aftune verify --processes N` uses: torchrun reports any non-zero exit as a crash)")
    return ap.parse_args()


def challenge_of(trace: str, c: Contract, nonce: str, windows: int | None) -> tuple[TraceReader, Integrity, Challenge] | None:
    """The trace's reader, integrity and challenge, or None if the trace does not even parse (main reports it)."""
    try:
        reader = TraceReader(trace)
        integrity = reader.check_integrity()
    except AftuneError:
        return None
    return reader, integrity, make_challenge(c, integrity.trace_root, bytes.fromhex(nonce), windows)


def run_shard(a: argparse.Namespace, nonce: str, only: list[int], data_check: bool) -> VerificationReport:
    cmd = [sys.executable, "-m", "aftune_hf", "verify", a.trace, "--contract", a.contract, "--nonce", nonce,
           "--json", "--only-windows", ",".join(map(str, only))]  # fmt: skip
    if a.windows:
        cmd += ["--windows", str(a.windows)]
    if a.model and data_check:
        cmd += ["--model", a.model]
    if a.signer and data_check:  # one process checks the signature, as it does the data
        cmd += ["--signer", a.signer]
    if not data_check:
        cmd.append("--no-data-check")
    p = subprocess.run(cmd, capture_output=True, text=True, env=sanitized_env())
    try:
        return report_from_json(json.loads(p.stdout))
    except (json.JSONDecodeError, KeyError, TypeError):
        c = load_contract(a.contract)
        return VerificationReport(ERROR, c.digest_hex(), c.audit.mode, nonce=nonce, error=p.stderr[-500:])


def main() -> int:
    a = parse()
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched or (a.num_processes and a.num_processes != state.num_processes):
        print(f"aftune: error: {state.num_processes} process(es) joined, {launched} launched "
              f"(expected {a.num_processes or launched}); see the docstring for a CPU launch that works",
              file=sys.stderr)  # fmt: skip
        return 2
    drawn = (a.nonce or os.urandom(16).hex()).encode()
    nonce = all_gather_bytes(drawn, state.device)[0].decode()  # the main process's nonce, for everyone
    contract = load_contract(a.contract)
    with tempfile.TemporaryDirectory(prefix=f"aftune-launch-{state.process_index}-") as tmp:
        source = a.trace
        try:
            a.trace = str(_local(a.trace, Path(tmp), a.endpoint, progress=state.is_main_process))
        except AftuneError as e:  # the download failed: every process reports it the same way
            return finish(a, state, _failed(contract, nonce, source, e), source=source)
        checked = challenge_of(a.trace, contract, nonce, a.windows)
        return _run(a, state, contract, nonce, checked, source)


def _local(trace: str, work: Path, endpoint: str | None, progress: bool) -> Path:
    from .hub import local_copy

    return local_copy(trace, work, endpoint=endpoint, progress=progress)


def _failed(c: Contract, nonce: str, source: str, e: AftuneError) -> VerificationReport:
    from .verify import failure_from

    if isinstance(e, ProviderFault):
        return VerificationReport(FAIL, c.digest_hex(), c.audit.mode, nonce=nonce, source=source,
                                  failures=(failure_from("structure", e),))  # fmt: skip
    return VerificationReport(ERROR, c.digest_hex(), c.audit.mode, nonce=nonce, source=source, error=f"{type(e).__name__}: {e}")


def _run(a: argparse.Namespace, state: PartialState, contract: Contract, nonce: str,
         checked: tuple[TraceReader, Integrity, Challenge] | None, source: str) -> int:  # fmt: skip
    if contract.training.world_size > 1 and contract.audit.mode == "exact":
        return finish(a, state, verify_as_recorded(a, state, contract, nonce, checked), source=source)
    if checked is None:  # structural failure: the main process reports it
        mine, data_check = [], state.is_main_process
    else:
        with state.split_between_processes(list(checked[2].chosen)) as part:
            mine = list(part)
        data_check = state.is_main_process
    report = run_shard(a, nonce, mine, data_check) if (mine or data_check) else None
    return finish(a, state, report, source=source, challenged=None if checked is None else checked[2].chosen)


def verify_as_recorded(a: argparse.Namespace, state: PartialState, c: Contract, nonce: str,
                       checked: tuple[TraceReader, Integrity, Challenge] | None) -> VerificationReport | None:  # fmt: skip
    """Every process replays every window together as DDP; the main process adds structure and data
    and returns the report (the others return None, or their ERROR)."""
    if state.num_processes != c.training.world_size:
        return VerificationReport(ERROR, c.digest_hex(), c.audit.mode, nonce=nonce, error=(
            f"the trace was recorded by {c.training.world_size} processes; exact replay needs as many "
            f"(accelerate launch --num_processes {c.training.world_size}), {state.num_processes} started"))  # fmt: skip
    windows, env_diffs = [], []
    try:
        if checked is not None and checked[2].chosen:
            reader, integrity, challenge = checked
            env_diffs = adopt_environment(reader.header()["environment"])  # the recorder's threads, per process
            with tempfile.TemporaryDirectory(prefix=f"aftune-verify-rank{state.process_index}-") as tmp:
                windows = check_windows(c, reader, integrity, challenge, list(challenge.chosen), Path(tmp),
                                        distributed=True, progress=state.is_main_process)  # fmt: skip
    except ProviderFault:
        windows = []  # the main process's structural check reports it as FAIL
    except (AftuneError, OSError, MemoryError) as e:
        return VerificationReport(ERROR, c.digest_hex(), c.audit.mode, nonce=nonce, error=f"{type(e).__name__}: {e}")
    if not state.is_main_process:
        return None  # every process replayed the same windows with the same gathered steps
    failures = tuple(f for w in windows for f in window_failures(w))
    if failures and env_diffs:
        return VerificationReport(ERROR, c.digest_hex(), c.audit.mode, nonce=nonce, windows=tuple(windows),
                                  failures=failures, error=environment_error(env_diffs))  # fmt: skip
    replayed = VerificationReport(FAIL if failures else PASS, c.digest_hex(), c.audit.mode, nonce=nonce,
                                  windows=tuple(windows), failures=failures)  # fmt: skip
    return merge_reports([run_shard(a, nonce, [], data_check=True), replayed])


def finish(a: argparse.Namespace, state: PartialState, report: VerificationReport | None, *, source: str,
           challenged: tuple[int, ...] | None = None) -> int:  # fmt: skip
    """Gather the reports, write and print the merged one on the main process; every process exits alike."""
    import dataclasses

    # every process gets every shard (as JSON bytes, no pickle): they all exit with the same code
    blobs = all_gather_bytes(json.dumps(report.to_json()).encode() if report else b"", state.device)
    parts = [report_from_json(json.loads(b)) if b else None for b in blobs]
    merged = merge_reports([r for r in parts if r is not None]) if state.num_processes > 1 else report
    merged = dataclasses.replace(merged, source=source)
    replayed = sorted(w.index for w in merged.windows)
    if challenged is not None and merged.verdict != FAIL and replayed != sorted(challenged):
        merged = dataclasses.replace(merged, verdict=ERROR, error=f"the processes replayed windows {replayed}, "
                                     f"the challenge chose {sorted(challenged)}")  # fmt: skip
    if not state.is_main_process:
        return merged.exit_code
    if a.report:
        merged.write(a.report)
    print(merged.summary())
    print(f"processes: {state.num_processes}; windows per process: "
          f"{[len(r.windows) if r else 0 for r in parts]}", flush=True)  # fmt: skip
    return merged.exit_code


def run() -> None:
    """Entry point: verify, tear the process group down, exit with the verdict's code (or write it
    to ``--exit-file`` and exit 0)."""
    code = main()
    state = PartialState()
    state.wait_for_everyone()
    exit_file = next((sys.argv[i + 1] for i, x in enumerate(sys.argv[:-1]) if x == "--exit-file"), None)
    if exit_file and state.is_main_process:
        from .safeio import atomic_write_bytes

        atomic_write_bytes(exit_file, str(code).encode())
    state.destroy_process_group()  # good practice; it does NOT prevent the rare gloo SIGABRT at exit (issue 16 note)
    raise SystemExit(0 if exit_file else code)


if __name__ == "__main__":
    run()

"""The ``aftune`` console script.

    aftune contract FILE          validate a contract, print its digest
    aftune contract init --model DIR --dataset PATH [--task T] [--lora R] [--set KEY=VALUE]... [-o FILE]
    aftune digest PATH            the digest of a model directory, dataset file/folder or recipe module
    aftune inspect TRACE          check a trace's integrity and summarise it
    aftune verify TRACE --contract FILE [--nonce HEX] [--windows N] [--model PATH] [--signer KEY.pub] [--report FILE.json]
    aftune calibrate TRACE --contract FILE   honest replay noise here vs. where the trace was recorded
    aftune verify-inference LOG --contract FILE [--trace TRACE] [--calls FILE] [--nonce HEX] [--device cuda]
    aftune report REPORT.json --html OUT.html   render a JSON report as a self-contained HTML page
    aftune push TRACE REPO_ID [--private] [--repo-type model|dataset] [--sign KEY]
    aftune keygen PATH            an Ed25519 signing key (PATH) and its public key (PATH.pub)
    aftune sign TRACE --key KEY   sign a sealed root (signature.dsse.json); verify with --signer KEY.pub
    aftune plan --steps N --anchor-every K [--bad-fraction F] [--confidence C] [--model DIR --layer-blocks 0,2,4]
    aftune cells challenge|open TRACE --contract FILE --nonce HEX [--out DIR]   layer-block cells (verify --openings DIR)
    TRACE and LOG may be hf://[datasets/]OWNER/NAME@COMMIT_SHA (downloaded at that commit only).

Exit codes: 0 success (PASS), 1 the trace failed a check (provider fault), 2 usage or
environment error, 3 INCONCLUSIVE (every check passed, but fewer windows than the contract's
``audit.min_detection`` needs). Set ``AFTUNE_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .cliargs import positive_int, quiet_libraries, signer_key, trace_dir
from .errors import AftuneError, ConfigError, ProviderFault, VerifierEnvironmentError


def _contract(args: argparse.Namespace) -> int:
    from .artifacts import check_artifacts
    from .contract import load_contract

    if args.file == "init":
        return _contract_init(args)
    if args.model or args.dataset:
        raise ConfigError("usage", "--model/--dataset go with `aftune contract init`")
    c = load_contract(args.file)
    if args.check_artifacts:
        check_artifacts(c)
    if args.json:
        print(json.dumps({"digest": c.digest_hex(), "contract": c.canonical()}, indent=2))
    else:
        print(c.digest_hex())
    return 0


def _contract_init(args: argparse.Namespace) -> int:
    from .scaffold import init_contract, parse_settings, write_contract

    if not (args.model and args.dataset):
        raise ConfigError("usage", "aftune contract init needs --model DIR and --dataset PATH")
    out = args.output or "contract.yaml"
    data = init_contract(args.model, args.dataset, task=args.task, lora=args.lora, trainer=args.trainer,
                         recipe=args.recipe, settings=parse_settings(args.set or []), relative_to=os.path.dirname(os.path.abspath(out)))  # fmt: skip
    write_contract(data, out, force=args.force)
    from .contract import load_contract

    print(f"wrote {out} (contract digest {load_contract(out).digest_hex()})")
    return 0


def _digest(args: argparse.Namespace) -> int:
    from .scaffold import digest_path

    if not os.path.exists(args.path) and ":" not in args.path:
        raise ConfigError("not_found", "no such file or directory", path=args.path)
    print(digest_path(args.path))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .records import hex_float
    from .trace import TraceReader

    trace_dir(args.trace)
    reader = TraceReader(args.trace)
    integrity = reader.check_integrity()
    header = reader.header()
    steps = [e.record for e in integrity.entries if e.record["kind"] == "step"]
    summary = {
        "trace_root": integrity.trace_root.hex(),
        "run_id": header["run_id"],
        "contract_digest": header["contract_digest"],
        "num_steps": integrity.num_steps,
        "num_records": len(integrity.entries),
        "resumes": sum(e.record["kind"] == "resume" for e in integrity.entries),
        "checkpoints": sum(r["checkpoint"] for r in steps),
        "anchors": [r["step"] for r in integrity.steps().values() if r["anchor"]],
        "final_state": integrity.root["final_state"],
        "environment": header["environment"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for k in ("trace_root", "run_id", "contract_digest", "num_steps", "num_records", "resumes", "checkpoints", "anchors", "final_state"):
        print(f"{k:16} {summary[k]}")
    print(f"{'step':>6} {'loss':>10} {'lr':>10}  data")
    for r in steps:
        print(f"{r['step']:>6} {hex_float(r, 'loss'):>10.4f} {hex_float(r, 'lr'):>10.3g}  {r['data'][:16]}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_trace

    trace_dir(args.trace)
    signer_key(args.signer)
    if args.windows is not None and args.windows < (0 if args.openings else 1):
        raise ConfigError("invalid_windows", f"--windows must be >= 1 (0 with --openings: cells only), got {args.windows}")
    if args.nonce is not None:
        from .verify.structure import parse_nonce

        parse_nonce(args.nonce)
    if args.processes is not None and args.processes > 1:
        return _verify_launched(args)
    log = None if args.quiet or args.json else (lambda m: print(f"aftune: {m}", file=sys.stderr, flush=True))
    only = None if args.only_windows is None else [int(i) for i in args.only_windows.split(",") if i.strip()]
    report = verify_trace(args.trace, args.contract, nonce=args.nonce, windows=args.windows, model=args.model, log=log,
                          only_windows=only, data_check=not args.no_data_check, endpoint=args.endpoint,
                          progress=log is not None, signer=args.signer, openings=args.openings, cells=args.cells)  # fmt: skip
    _write_reports(report, args)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        if args.nonce is None:
            print(f"drew nonce {report.nonce} (pass --nonce to repeat this audit)")
        print(report.summary())
    return report.exit_code


def _verify_launched(args: argparse.Namespace) -> int:
    """``--processes N``: the same verification under ``accelerate launch`` (N processes, gloo on a
    CPU), with this command's exit code and output -- not torchrun's crash report."""
    import subprocess
    import tempfile

    import torch

    if args.only_windows is not None or args.no_data_check or args.html or args.json or args.openings:
        raise ConfigError("invalid_arguments", "--processes takes TRACE, --contract, --nonce, --windows, --model, "
                          "--report, --endpoint and --quiet")  # fmt: skip
    n = str(args.processes)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # with --multi_gpu this starts N CPU processes on gloo
    with tempfile.TemporaryDirectory(prefix="aftune-processes-") as tmp:
        code_file = os.path.join(tmp, "exit-code")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", n,
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "aftune_hf.launch",
               args.trace, "--contract", args.contract, "--num-processes", n, "--exit-file", code_file]  # fmt: skip
        for flag, value in (("--nonce", args.nonce), ("--windows", args.windows), ("--model", args.model),
                            ("--report", args.report), ("--endpoint", args.endpoint), ("--signer", args.signer)):  # fmt: skip
            if value is not None:
                cmd += [flag, str(value)]
        p = subprocess.run(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True)
        try:
            return int(open(code_file, encoding="ascii").read())
        except (OSError, ValueError):
            tail = "\n".join(p.stderr.strip().splitlines()[-15:])
            raise VerifierEnvironmentError("launch_failed", f"accelerate launch exited {p.returncode} without a "
                                           f"verdict:\n{tail}") from None  # fmt: skip


def _verify_inference(args: argparse.Namespace) -> int:
    from .verify_inference import verify_inference

    trace_dir(args.log, "log")
    signer_key(args.signer)
    if args.trace is not None:
        trace_dir(args.trace)
    log = None if args.quiet or args.json else (lambda m: print(f"aftune: {m}", file=sys.stderr, flush=True))
    report = verify_inference(args.log, args.contract, trace=args.trace, calls=args.calls, nonce=args.nonce,
                              num_calls=args.num_calls, log_fn=log, endpoint=args.endpoint, device=args.device,
                              signer=args.signer)  # fmt: skip
    _write_reports(report, args)
    print(json.dumps(report.to_json(), indent=2, sort_keys=True) if args.json else report.summary())
    return report.exit_code


def _write_reports(report, args: argparse.Namespace) -> None:
    if args.report:
        report.write(args.report)
    if args.html:
        from .htmlreport import write_html

        write_html(report, args.html)


def _report(args: argparse.Namespace) -> int:
    from .htmlreport import write_html
    from .report import report_from_json

    try:
        report = report_from_json(json.loads(open(args.report, encoding="utf-8").read()))
    except FileNotFoundError:
        raise ConfigError("report_not_found", "no such file", path=args.report) from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a JSON list has no .get
        raise ConfigError("invalid_report", f"not an aftune JSON report: {e}", path=args.report) from None
    if args.html:
        write_html(report, args.html)
        if not args.quiet:
            print(f"wrote {args.html}", file=sys.stderr)
    else:
        print(report.summary())
    return report.exit_code


def _push(args: argparse.Namespace) -> int:
    from .hub import push_trace

    trace_dir(args.trace, "trace or inference log")
    result = push_trace(args.trace, args.repo_id, private=args.private, repo_type=args.repo_type,
                        endpoint=args.endpoint, progress=not (args.quiet or args.json), sign_key=args.sign)  # fmt: skip
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"trace root  {result.trace_root or '(unfinished trace)'}")
    print(f"commit sha  {result.commit_sha}")
    print(f"pin it:     {result.uri}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from .attest import public_key, write_keypair

    private, public = write_keypair(args.path, force=args.force)
    print(f"wrote {private} (keep it secret) and {public} (give it to your clients); key id {public_key(public).keyid}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from .attest import sign_root

    trace_dir(args.trace, "trace or inference log")
    contract = None
    if args.contract:
        from .contract import load_contract

        contract = load_contract(args.contract).digest_hex()
    print(f"wrote {sign_root(args.trace, args.key, contract_digest=contract)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .report import plan

    try:
        p = plan(args.steps, args.anchor_every, args.bad_fraction, args.confidence)
    except ValueError as e:
        raise ConfigError("invalid_plan", str(e)) from None
    if not args.json:
        print(f"{p['windows']} of {p['windows_total']} windows (re-executing {p['share_reexecuted']:.1%} of training) "
              f"catch a provider who falsified {args.bad_fraction:.1%} of the windows with probability {p['probability']:.2%}")  # fmt: skip
        print(f"set audit.windows: {p['windows']} in the contract (or pass --windows {p['windows']} to aftune verify)")
    if args.layer_blocks:
        from .cells.cli import print_cell_plan

        print_cell_plan(args, p)
    if args.json:
        print(json.dumps(p, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    result = calibrate(args.trace, args.contract, windows=args.windows, safety=args.safety)
    print(json.dumps(result, indent=2) if args.json else result["summary"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aftune", description="Auditable fine-tuning for the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"aftune_hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("contract", help="validate a contract and print its digest; `contract init` writes one")
    p.add_argument("file", help="the contract YAML, or `init` to write a new one")
    p.add_argument("--check-artifacts", action="store_true", help="also hash the local base model and dataset")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("contract init")
    g.add_argument("--model", help="base model directory (config.json, *.safetensors, tokenizer)")
    g.add_argument("--dataset", help="dataset file or folder (json/jsonl/csv/parquet/txt)")
    g.add_argument("--task", default="causal_lm", choices=["causal_lm", "sequence_classification"])
    g.add_argument("--lora", type=positive_int, metavar="R", help="LoRA of rank R (default: full fine-tune)")
    g.add_argument("--trainer", default="transformers:Trainer", help="module:Class, e.g. trl:SFTTrainer")
    g.add_argument("--recipe", help="your own recipe module:function (its source is bound by recipe_digest)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any field, e.g. training.max_steps=200")
    g.add_argument("-o", "--output", help="where to write (default contract.yaml)")
    g.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_contract)
    p = sub.add_parser("digest", help="print the digest of a model directory, dataset file/folder or recipe module")
    p.add_argument("path", help="model directory, dataset path, recipe .py file or module:function")
    p.set_defaults(func=_digest)
    p = sub.add_parser("inspect", help="check a trace's integrity and summarise it")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="verify a trace against your contract (structure, data, re-executed windows)")
    p.add_argument("trace")
    p.add_argument("--contract", required=True, help="your own copy of the contract")
    p.add_argument("--nonce", help="challenge nonce (hex); drawn at random and printed when absent")
    p.add_argument("--windows", type=int, help="windows to re-execute (default: the contract's audit.windows; 0 with --openings: cells only)")
    p.add_argument("--openings", help="the provider's opening of this nonce's cells (aftune cells open): check them too")
    p.add_argument("--cells", type=positive_int, help="cells challenged (default: the contract's audit.cells)")
    p.add_argument("--model", help="the weights or adapter you received; must equal the trace's final state")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--endpoint", help="Hub URL for hf:// traces (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--processes", type=positive_int, help="run under accelerate launch with N processes "
                   "(CPU: gloo; GPU: one per device); same verdict, report and exit code")
    p.add_argument("--signer", metavar="KEY.pub", help="the provider's public key you pinned: FAIL unless the root is signed by it")
    p.add_argument("--only-windows", help=argparse.SUPPRESS)  # used by aftune_hf.launch to split work
    p.add_argument("--no-data-check", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_verify)
    p = sub.add_parser("verify-inference", help="spot-check committed inference calls with one forward pass each")
    p.add_argument("log")
    p.add_argument("--contract", required=True, help="your own copy of the contract")
    p.add_argument("--trace", help="the audited training trace (its final state must have served the calls)")
    p.add_argument("--calls", help="JSON file of the calls you made (prompt and output per row)")
    p.add_argument("--nonce", help="hex; picks the calls to check when --calls is absent")
    p.add_argument("--num-calls", type=int, help="calls to sample (default: the contract's audit.inference_calls)")
    p.add_argument("--endpoint", help="Hub URL for hf:// logs and traces")
    p.add_argument("--device", default="cpu", help="where the teacher-forced passes run (e.g. cuda; default cpu)")
    p.add_argument("--signer", metavar="KEY.pub", help="the provider's public key you pinned: FAIL unless the log root is signed by it")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_verify_inference)
    p = sub.add_parser("report", help="render a JSON report (from verify --report) as HTML, or summarise it")
    p.add_argument("report", help="the JSON report")
    p.add_argument("--html", help="write a self-contained HTML page here (otherwise print the summary)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_report)
    p = sub.add_parser("push", help="push a finished trace or inference log to the Hub; prints root and commit sha")
    p.add_argument("trace")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--json", action="store_true", help="print repo, commit sha, trace root and URI as JSON")
    p.add_argument("--quiet", action="store_true", help="no upload progress bars")
    p.add_argument("--sign", metavar="KEY", help="sign the root with this private key, bound to the repo and commit")
    p.set_defaults(func=_push)
    p = sub.add_parser("keygen", help="write an Ed25519 signing key (PATH) and its public key (PATH.pub)")
    p.add_argument("path")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(func=_keygen)
    p = sub.add_parser("sign", help="sign a finished trace's (or an inference log's newest) root: signature.dsse.json")
    p.add_argument("trace", help="the trace or inference log directory")
    p.add_argument("--key", required=True, help="your private key (aftune keygen)")
    p.add_argument("--contract", help="inference logs: the contract the calls were served under")
    p.set_defaults(func=_sign)
    p = sub.add_parser("plan", help="windows needed to catch a given fraction of falsified windows")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--anchor-every", type=int, required=True)
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--confidence", type=float, default=0.99)
    p.add_argument("--model", help="with --layer-blocks: the base model directory (its config.json)")
    p.add_argument("--layer-blocks", help="block boundaries, e.g. 0,2,4: also plan layer-block cells")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)
    from .cells.cli import add_parsers

    add_parsers(sub)
    p = sub.add_parser("calibrate", help="measure honest replay noise here against a trace recorded elsewhere")
    p.add_argument("trace")
    p.add_argument("--contract", required=True)
    p.add_argument("--windows", type=int, help="windows to replay (default: all)")
    p.add_argument("--safety", type=float, default=10.0, help="threshold = safety x largest honest distance")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return args.func(args)
    except BrokenPipeError:  # `aftune inspect ... | head`: the reader left; end quietly (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except AftuneError as e:
        if os.environ.get("AFTUNE_DEBUG"):
            raise
        fault = isinstance(e, ProviderFault)
        line = " ".join(str(e).split())  # one line, whatever the message held
        print(f"aftune: {'FAIL' if fault else 'error'}: {line}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"verdict": "FAIL" if fault else "ERROR", "error": e.code, "detail": line,
                              "path": getattr(e, "path", None)}))  # fmt: skip
        return 1 if fault else 2
    except Exception:  # a bug or an environment problem: never exit 1 (that means FAIL)
        traceback.print_exc()
        print("aftune: error: unexpected internal error (exit 2); please report it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

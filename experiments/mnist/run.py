"""MNIST experiments of Blundell et al. (2015), section 5.1: Table 1, Table 2, Figures 3 and 4.

Every row is an ordinary `bbb train` run (the library's Trainer), configured by the TOML files
beside this script; this driver only chooses configs, budgets and seeds, and summarises.

    python experiments/mnist/run.py table1 --budget cpu --out runs/mnist          # resumable
    python experiments/mnist/run.py table2 --out runs/mnist                       # prune by SNR
    python experiments/mnist/run.py extras --out runs/mnist                       # NLL/ECE/OOD, figures
    python experiments/mnist/run.py report --out runs/mnist                       # markdown tables

Budgets: ``cpu`` trains the 1200-unit rows for 20-100 epochs each (about 2 hours on 2 cores; the
scale-mixture row's 100 epochs are ~70 minutes of it with the native kernels);
``paper`` trains all widths for hundreds of epochs (for a GPU: add ``--device cuda``).
Re-running a command resumes unfinished runs from their checkpoints and skips finished ones.
``table1 --jobs N`` trains up to N rows at once, each in its own process (on a GPU machine the
small networks are bound by kernel launches, one core per process, so rows in parallel share
the GPU; on 2 CPU cores, ``--jobs 2`` runs two rows on one thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (supported): tomli, a dependency there, is the same parser
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
METHODS = ("sgd", "dropout", "bbb-gaussian", "bbb-mixture")
# Published test errors (%), Blundell et al. 2015, Table 1 (widths 400 / 800 / 1200).
PAPER_TABLE1 = {
    "sgd": {400: 1.83, 800: 1.84, 1200: 1.88},
    "dropout": {400: 1.51, 800: 1.33, 1200: 1.36},
    "bbb-gaussian": {400: 1.82, 800: 1.99, 1200: 2.04},
    "bbb-mixture": {400: 1.36, 800: 1.34, 1200: 1.32},
}
# Blundell et al. 2015, Table 2 (2x1200 BBB, scale mixture; pruned at the end of training).
PAPER_TABLE2 = {0.0: 1.24, 0.5: 1.24, 0.75: 1.24, 0.95: 1.29, 0.98: 1.39}


class Budget(TypedDict):
    widths: list[int]  # the hidden widths trained
    epochs: dict[str, int]  # per method


BUDGETS: dict[str, Budget] = {
    "cpu": {
        "widths": [1200],
        "epochs": {"sgd": 20, "dropout": 20, "bbb-gaussian": 25, "bbb-mixture": 100},
    },
    "paper": {
        "widths": [400, 800, 1200],
        "epochs": {"sgd": 600, "dropout": 600, "bbb-gaussian": 600, "bbb-mixture": 600},
    },
}


def _cfg(
    method: str,
    width: int,
    epochs: int,
    seed: int,
    extra: dict[str, Any],
    dropped: dict[str, str] | None = None,
) -> Any:
    """The validated config of one row. ``extra`` (``--set``) keys that this row's method
    does not read (a prior setting for the SGD row) are left out of it and, with where they
    apply, added to ``dropped``; a key its own config file sets is never left out."""
    from bbb.config import TrainConfig, load_config_file

    source = str(HERE / f"{method}.toml")
    base = load_config_file(source)
    values = {**base, "hidden": [width, width], "epochs": epochs, "seed": seed, **extra}
    unused = TrainConfig.from_dict(values, source=source).unused_settings()
    for key in set(unused) & set(extra) - set(base):
        del values[key]
        if dropped is not None:
            dropped[key] = unused[key]
    return TrainConfig.from_dict(values, source=source).validate()


# keys each row sets itself (its run directory is named by the first three): a --set of one
# trained rows other than their names and the report say, or overrode a flag
_ROW_KEYS = {
    "hidden": "--widths",
    "epochs": "--epochs",
    "seed": "--seeds",
    "method": "--methods",
    "dataset": "--methods (every row is MNIST)",
    "subset": "--subset",
    "data_dir": "--data-dir",
    "device": "--device",
}


def _parse_set(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: a TrainConfig key the rows do not set themselves, and its
    TOML value; anything else is refused naming the option, not a config file."""
    from bbb.config import TrainConfig

    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
        raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    if key in _ROW_KEYS:
        raise SystemExit(f"--set {key}: each row sets {key} itself; use {_ROW_KEYS[key]}")
    names = TrainConfig.field_names()
    if key not in names:
        import difflib

        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SystemExit(
            f"--set: unknown key {key!r}{hint}; valid keys: "
            + ", ".join(k for k in names if k not in _ROW_KEYS)
        )
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(
            f"--set {item!r}: {value!r} is not a TOML value ({e}); a string needs quotes, "
            f"e.g. --set '{key}=\"{value}\"'"
        ) from None


def run_dir(out: Path, method: str, width: int, seed: int) -> Path:
    return out / f"{method}-{width}-s{seed}"


def _show_progress(quiet: bool) -> bool:
    """Progress bars as ``bbb train`` draws them: not with ``--quiet`` and only on a terminal
    (a bar redrawn with carriage returns into a log file, ``2> log`` or nohup, leaves partial
    lines; the per-epoch lines, printed either way, say the same there)."""
    if quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def table1(args: argparse.Namespace) -> None:
    from bbb.runs import train_run

    budget = BUDGETS[args.budget]
    widths = args.widths or budget["widths"]
    extra: dict[str, Any] = {"device": args.device}
    if args.subset is not None:  # 0 is refused by the config's check, not ignored
        extra["subset"] = args.subset
    if args.data_dir:
        extra["data_dir"] = args.data_dir
    for item in args.set or []:  # KEY=VALUE, VALUE in TOML syntax (e.g. lr_schedule="cosine")
        key, value = _parse_set(item)
        extra[key] = value
    rows = []  # (seed, width, method, epochs, run directory, config, --set keys it does
    # not read) still to train
    dropped: list[dict[str, str]] = []  # per row, the --set keys it does not read
    conflicts: list[str] = []  # run directories holding a run of other settings
    # a value given twice (--seeds 0 0) is one row: two children would train one directory
    for seed in dict.fromkeys(args.seeds):
        for width in dict.fromkeys(widths):
            for method in dict.fromkeys(args.methods):
                # --epochs 0 is refused by the config's check (`or` ran the whole budget)
                epochs = args.epochs if args.epochs is not None else budget["epochs"][method]
                dropped.append({})  # validated before anything runs:
                cfg = _cfg(method, width, epochs, seed, extra, dropped[-1])
                rd = run_dir(args.out, method, width, seed)
                diff = _other_settings(rd, cfg)
                if diff:
                    conflicts.append(f"{rd} ({'; '.join(diff)})")
                    continue
                if _finished(rd, cfg):
                    print(f"[done] {rd}")
                    continue
                rows.append((seed, width, method, epochs, rd, cfg, set(dropped[-1])))
    unread = set.intersection(*(set(d) for d in dropped)) if dropped else set()
    if unread:  # no row reads it: a mistake, not an override
        where = "; ".join(f"{k}: {dropped[0][k]}" for k in sorted(unread))
        raise SystemExit(f"--set: no row of methods {', '.join(args.methods)} reads {where}")
    if conflicts:  # a finished row was reported done, an unfinished one refused mid-table
        from bbb.runs import RESUMABLE_CHANGES

        raise SystemExit(
            "table1: these run directories hold runs with other settings (only "
            f"{', '.join(RESUMABLE_CHANGES)} may differ): {', '.join(conflicts)}; use the same "
            "settings or another --out"
        )
    if args.jobs > 1 and len(rows) > 1:
        _train_in_parallel(args, rows)
        return
    for _, _, _, epochs, rd, cfg, _ in rows:
        resume = (rd / "checkpoints").is_dir() and any((rd / "checkpoints").iterdir())
        print(f"[{'resume' if resume else 'train'}] {rd} ({epochs} epochs)", flush=True)
        train_run(cfg, rd, resume=resume, progress=_show_progress(args.quiet))


def _train_in_parallel(args: argparse.Namespace, rows: list[tuple[Any, ...]]) -> None:
    """Train the rows as up to ``args.jobs`` child processes of this script at a time.

    Each child is ``table1`` for one row (the same budget, epochs, data and the ``--set``
    options it reads), resumes its own run directory, runs on ``max(1, cores // jobs)`` threads and
    writes its output to ``OUT/<run directory>.log``. Longest rows start first. A small network
    on a GPU is bound by the host's kernel launches, one core per process: several processes
    then share the GPU (the paper budget's rows). If this process is interrupted, the children
    are stopped (their last checkpoints stay intact: re-running resumes); a failed row is
    reported with its log once the others have finished.
    """
    import os
    import subprocess

    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    common = ["--budget", args.budget, "--out", str(args.out), "--device", args.device]
    common += ["--quiet", "--jobs", "1", "--threads-per-job", str(threads)]
    if args.epochs is not None:
        common += ["--epochs", str(args.epochs)]
    if args.subset is not None:
        common += ["--subset", str(args.subset)]
    if args.data_dir:
        common += ["--data-dir", str(args.data_dir)]
    queue = sorted(rows, key=lambda r: -r[3])  # longest first: the shortest total time
    args.out.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen[bytes], Path, Any]] = []
    failed: list[tuple[Path, int, Path]] = []
    print(
        f"[parallel] {len(queue)} rows, {args.jobs} at a time, {threads} thread(s) each", flush=True
    )
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                seed, width, method, epochs, rd, _, unread = queue.pop(0)
                log_path = args.out / f"{rd.name}.log"
                cmd = [sys.executable, str(Path(__file__).resolve()), "table1", *common]
                cmd += ["--methods", method, "--widths", str(width), "--seeds", str(seed)]
                for item in args.set or []:  # the --set keys this row reads
                    if item.partition("=")[0].strip() not in unread:
                        cmd += ["--set", item]
                log = open(log_path, "ab")  # noqa: SIM115 - closed when the child ends
                print(f"[start] {rd} ({epochs} epochs), log {log_path}", flush=True)
                child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((child, rd, log))
            time.sleep(0.5)
            for item in list(running):
                child, rd, log = item
                code = child.poll()
                if code is None:
                    continue
                running.remove(item)
                log.close()
                print(f"[{'done' if code == 0 else f'failed ({code})'}] {rd}", flush=True)
                if code != 0:
                    failed.append((rd, code, args.out / f"{rd.name}.log"))
    finally:
        for child, _, _log in running:  # interrupted: stop the children, keep their checkpoints
            child.terminate()
        for child, _, log in running:
            try:
                child.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: kill
                child.kill()
                child.wait()
            log.close()
    if failed:
        lines = []
        for rd, code, log_path in failed:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            lines.append(f"  {rd} (exit {code}; log {log_path}):\n    " + "\n    ".join(tail))
        raise SystemExit(f"{len(failed)} row(s) failed:\n" + "\n".join(lines))


def _other_settings(rd: Path, cfg: Any) -> list[str]:
    """``"key: saved -> now"`` for each setting in which the run saved in ``rd`` differs from
    ``cfg`` (none when ``rd`` holds no run), other than those a resumed run may change."""
    from bbb.config import TrainConfig, changed_settings, load_config_file
    from bbb.runs import RESUMABLE_CHANGES

    saved = rd / "config.json"
    if not saved.is_file():
        return []
    old = TrainConfig.from_dict(load_config_file(saved), source=str(saved)).to_dict()
    return changed_settings(old, cfg.to_dict(), RESUMABLE_CHANGES)


def _finished(rd: Path, cfg: Any) -> bool:
    """Whether the run in ``rd`` is done for ``cfg``: its ``metrics.json`` records all of
    ``cfg.epochs`` epochs, or an early stop (``patience``) that ``cfg`` would not undo.

    A resumed run that stopped early stays stopped (the trainer trains on only with a larger
    patience, or none), so resuming it would only evaluate it again and rewrite its
    ``metrics.json``. The early stop counts only if ``metrics.json`` was written after the
    ``config.json`` of the run's last start (not by an earlier attempt before a resume with a
    larger patience that has not finished).
    """
    from bbb.config import TrainConfig, load_config_file

    metrics, saved = rd / "metrics.json", rd / "config.json"
    try:
        summary = json.loads(metrics.read_text())["summary"]
        if int(summary["epochs_trained"]) >= cfg.epochs:
            return True
        if summary.get("stopped_early") is not True or cfg.patience is None:
            return False
        if metrics.stat().st_mtime_ns < saved.stat().st_mtime_ns:
            return False  # a later start of the run has not finished
        old = TrainConfig.from_dict(load_config_file(saved), source=str(saved))
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return old.patience is not None and cfg.patience <= old.patience


def _find_runs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if (p / "config.json").is_file()) if out.is_dir() else []


def _finished_runs(out: Path, command: str) -> list[Path]:
    """The runs under ``out`` that finished the epochs of their last start (its config.json);
    each unfinished one is named and skipped: its best or last checkpoint is not the trained
    network a table reports, and it has no metrics.json to summarise."""
    from bbb.config import ConfigError, TrainConfig, load_config_file

    done = []
    for rd in _find_runs(out):
        try:
            saved = TrainConfig.from_dict(load_config_file(rd / "config.json"))
        except (ConfigError, OSError) as e:
            print(f"[skip] {rd}: unreadable config.json ({e})", flush=True)
            continue
        if _finished(rd, saved):
            done.append(rd)
        else:
            print(
                f"[skip] {rd}: unfinished (no metrics.json of its {saved.epochs} epochs); run "
                f"table1 to finish it, then {command} again",
                flush=True,
            )
    return done


def table2(args: argparse.Namespace) -> None:
    """Prune the end-of-training BBB scale-mixture network by SNR; evaluate; export compactly."""
    from torch.utils.data import DataLoader

    from bbb.pruning import dense_state_bytes, load_compact, prune_by_snr, save_compact
    from bbb.runs import load_run
    from bbb.train.checkpoint import atomic_write_text
    from bbb.train.trainer import evaluate

    prefix = f"bbb-mixture-{args.width}-"
    if not any(p.name.startswith(prefix) for p in _find_runs(args.out)):
        raise SystemExit(f"no bbb-mixture-{args.width} run under {args.out}: run `table1` first")
    runs = [p for p in _finished_runs(args.out, "table2") if p.name.startswith(prefix)]
    if not runs:
        raise SystemExit(f"no finished bbb-mixture-{args.width} run under {args.out}")
    for rd in runs:
        results: dict[str, Any] = {
            "run": str(rd),
            "checkpoint": "last (end of training)",
            "rows": [],
        }
        for fraction in args.fractions:
            cfg, model, likelihood, data = load_run(rd, which="last")
            pr = prune_by_snr(model, fraction)
            assert data.test is not None
            torch.manual_seed(args.seed)  # the weight samples: the same command, the same numbers
            report = evaluate(
                model,
                DataLoader(data.test, batch_size=1000),
                likelihood,
                num_samples=args.num_samples,
                device=cfg.device,
            )
            row = {
                "fraction": fraction,
                "removed": pr.removed,
                "total": pr.total,
                "test_error_pct": 100 * report["error"],
                "test_nll": report["nll"],
            }
            if fraction > 0:
                path = rd / f"pruned-{fraction:g}.pt"
                row["compact_bytes"] = save_compact(model, path)
                row["dense_bytes"] = dense_state_bytes(model)
                cfg2, model2, _, _ = load_run(rd, which="last")
                load_compact(model2, path)
                with torch.no_grad():
                    x = data.test.tensors[0][:500].to(cfg.device)  # the models' device
                    from bbb.nn.module import sampling

                    with sampling(model, "mean"), sampling(model2, "mean"):
                        row["compact_roundtrip_exact"] = bool(torch.equal(model(x), model2(x)))
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        atomic_write_text(rd / "table2.json", json.dumps(results, indent=2) + "\n")


def extras(args: argparse.Namespace) -> None:
    """Test NLL/ECE of every run, OOD AUROC by predictive entropy, Figures 3 and 4."""
    from bbb.metrics import auroc
    from bbb.nn.module import BayesModule
    from bbb.plots import figure
    from bbb.predictive import predict
    from bbb.pruning import snr
    from bbb.runs import load_run
    from bbb.train.checkpoint import atomic_write_text

    out: dict[str, Any] = {}
    # Figure 3: per method, the weights of its widest network (the paper's 1200 units), first
    # seed: another width's run under the same label made the histogram that of the run
    # summarised last
    weights: dict[str, tuple[tuple[int, int], str, torch.Tensor]] = {}
    for rd in _finished_runs(args.out, "extras"):
        cfg, model, likelihood, data = load_run(rd, which="best")
        assert data.test is not None
        # every run sees the same noise images and its own seeded weight samples: a run's
        # numbers do not depend on which runs were summarised before it
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(args.seed)
        x = data.test.tensors[0].to(cfg.device)  # the model's device (a GPU run's too)
        samples = args.num_samples if cfg.method == "bbb" else 1
        pred = predict(model, x, num_samples=samples)
        # out-of-distribution inputs: the test digits rotated by 90 degrees, and uniform noise
        # images in the same pixel range (0..255 / 126)
        img = x.reshape(-1, 28, 28)
        rotated = torch.rot90(img, 1, dims=(1, 2)).reshape(len(x), -1)
        noise = (torch.rand(x.shape, generator=gen) * (255.0 / 126.0)).to(x)
        ent_in = pred.entropy
        ent_rot = predict(model, rotated, num_samples=samples).entropy
        ent_noise = predict(model, noise, num_samples=samples).entropy
        metrics = json.loads((rd / "metrics.json").read_text()).get("test", {})
        out[rd.name] = {
            **{f"test_{k}": v for k, v in metrics.items()},
            "auroc_rotated": auroc(ent_in, ent_rot),
            "auroc_noise": auroc(ent_in, ent_noise),
        }
        print(rd.name, json.dumps(out[rd.name]), flush=True)
        if cfg.method == "bbb":
            w = torch.cat(
                [
                    (m.weight_mu + m.weight_sigma * torch.randn_like(m.weight_mu))
                    .detach()
                    .flatten()
                    for m in model.modules()
                    if isinstance(m, BayesModule)
                ]
            )
            s = torch.cat([v.flatten() for v in snr(model).values()]).cpu()
            label = cfg.method + "-" + cfg.prior
            _snr_figure(figure, s, args.out / f"fig4_snr_{rd.name}.png")
        else:
            w = torch.cat(
                [
                    m.weight.detach().flatten()
                    for m in model.modules()
                    if isinstance(m, torch.nn.Linear)
                ]
            )
            label = cfg.method
        rank = (-cfg.hidden[0], cfg.seed)  # the widest network, then the lowest seed
        if label not in weights or rank < weights[label][0]:
            weights[label] = (rank, rd.name, w.cpu())
    atomic_write_text(args.out / "extras.json", json.dumps(out, indent=2) + "\n")
    if weights:
        fig = figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, (_, run, w) in weights.items():
            ax.hist(
                w.clamp(-0.3, 0.3).numpy(),
                bins=200,
                density=True,
                histtype="step",
                label=f"{name} ({run})",
            )
        ax.set_xlabel("weight")
        ax.set_ylabel("density")
        ax.set_title("Trained weights (BBB: one posterior sample), cf. paper Fig. 3", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "fig3_weights.png", dpi=110)


def _snr_figure(figure: Any, s: torch.Tensor, path: Path) -> None:
    db = 10 * torch.log10(s.clamp_min(1e-12))
    fig = figure(figsize=(9, 3.5))
    a1, a2 = fig.subplots(1, 2)
    a1.hist(db.numpy(), bins=200, density=True)
    a1.set_xlabel("signal-to-noise ratio (dB)")
    a1.set_ylabel("density")
    srt = torch.sort(db).values
    a2.plot(srt.numpy(), torch.linspace(0, 1, len(srt)).numpy())
    a2.set_xlabel("signal-to-noise ratio (dB)")
    a2.set_ylabel("CDF")
    fig.suptitle("SNR |mu|/sigma of the weights, cf. paper Fig. 4", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mean_sd(values: list[float]) -> str:
    """``mean +- sd`` (sample sd, n - 1) of ``values``, two decimals."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} +- {sd:.2f}"


def report(args: argparse.Namespace) -> None:
    """Print Table 1 and Table 2 as markdown next to the paper's numbers: one row per run, then,
    where a method and width have several seeds, their mean +- sd (sample sd over seeds)."""
    print(
        "| method | width | epochs | best epoch | test error % (ours) | paper | val error % | test NLL | test ECE | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rd in _find_runs(args.out):
        cfgd = json.loads((rd / "config.json").read_text())
        mpath = rd / "metrics.json"
        if not mpath.exists():
            continue
        m = json.loads(mpath.read_text())
        method = rd.name.rsplit("-", 2)[0]
        width = cfgd["hidden"][0]
        paper = PAPER_TABLE1.get(method, {}).get(width, float("nan"))
        s = m["summary"]
        groups.setdefault((method, width), []).append(m)
        print(
            f"| {method} | {width} | {s['epochs_trained']} | {s['best_epoch']} | "
            f"{100 * m['test']['error']:.2f} | {paper} | {100 * m['val']['error']:.2f} | "
            f"{m['test']['nll']:.4f} | {m['test']['ece']:.4f} | {s.get('wall_seconds', float('nan')):.0f} |"
        )
    several = {k: v for k, v in groups.items() if len(v) > 1}
    if several:
        print("\nOver seeds (mean +- sd, sample sd):\n")
        print("| method | width | seeds | test error % | paper | val error % | test NLL x 100 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for (method, width), ms in sorted(several.items()):
            paper = PAPER_TABLE1.get(method, {}).get(width, float("nan"))
            test = _mean_sd([100 * m["test"]["error"] for m in ms])
            val = _mean_sd([100 * m["val"]["error"] for m in ms])
            nll = _mean_sd([100 * m["test"]["nll"] for m in ms])
            print(f"| {method} | {width} | {len(ms)} | {test} | {paper} | {val} | {nll} |")
    tables: dict[str, list[list[dict[str, Any]]]] = {}  # "bbb-mixture-1200" -> seeds' rows
    for rd in _find_runs(args.out):
        t2 = rd / "table2.json"
        if t2.exists():
            rows = json.loads(t2.read_text())["rows"]
            tables.setdefault(rd.name.rsplit("-", 1)[0], []).append(rows)
            print(f"\nTable 2 ({rd.name}, end of training):\n")
            print("| removed | test error % (ours) | paper | compact size (bytes) | dense size |")
            print("| --- | --- | --- | --- | --- |")
            for row in rows:
                f = row["fraction"]
                print(
                    f"| {100 * f:.0f}% | {row['test_error_pct']:.2f} | {PAPER_TABLE2.get(f, 'n/a')} | "
                    f"{row.get('compact_bytes', '-')} | {row.get('dense_bytes', '-')} |"
                )
    for name, seeds in tables.items():
        if len(seeds) < 2:
            continue
        print(f"\nTable 2, {name}, over {len(seeds)} seeds (mean +- sd, sample sd):\n")
        print("| removed | test error % | paper |")
        print("| --- | --- | --- |")
        by_fraction: dict[float, list[float]] = {}
        for rows in seeds:
            for row in rows:
                by_fraction.setdefault(row["fraction"], []).append(row["test_error_pct"])
        for f, errs in by_fraction.items():
            if len(errs) > 1:
                print(f"| {100 * f:.0f}% | {_mean_sd(errs)} | {PAPER_TABLE2.get(f, 'n/a')} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t1 = sub.add_parser("table1", help="train the rows of Table 1")
    t1.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    t1.add_argument("--widths", type=int, nargs="+")
    t1.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    t1.add_argument("--seeds", type=int, nargs="+", default=[0])
    t1.add_argument("--epochs", type=int, help="override the budget's epochs")
    t1.add_argument("--subset", type=int, help="first N training images (smoke tests)")
    t1.add_argument("--data-dir")
    t1.add_argument("--device", default="cpu")
    t1.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, as bbb train --quiet (bars are drawn only when stderr is a "
        "terminal; the per-epoch lines are printed either way)",
    )
    t1.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train up to N rows at once, each in a child process (its log: OUT/<row>.log)",
    )
    t1.add_argument(
        "--threads-per-job",
        type=int,
        help="threads of each row's process (default: cores / jobs with --jobs > 1)",
    )
    t1.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key for every row that reads it (TOML value: --set "
        'lr_schedule="cosine"; a prior setting changes the BBB rows only)',
    )
    t2 = sub.add_parser("table2", help="prune the BBB scale-mixture 1200 runs by SNR")
    t2.add_argument("--fractions", type=float, nargs="+", default=list(PAPER_TABLE2))
    t2.add_argument("--num-samples", type=int, default=10)
    t2.add_argument("--width", type=int, default=1200, help="which width's runs to prune")
    t2.add_argument("--seed", type=int, default=0, help="seed of the evaluation's weight samples")
    ex = sub.add_parser("extras", help="NLL, ECE, OOD AUROC, figures")
    ex.add_argument("--num-samples", type=int, default=10)
    ex.add_argument("--seed", type=int, default=0, help="seed of the weight samples")
    sub.add_parser("report", help="markdown tables")
    for sp in sub.choices.values():
        sp.add_argument("--out", type=Path, default=Path("runs/mnist"))
    args = p.parse_args(argv)
    if args.cmd == "table1":
        if args.jobs < 1:
            p.error(f"--jobs must be at least 1, got {args.jobs}")
        if args.threads_per_job is not None:
            if args.threads_per_job < 1:
                p.error(f"--threads-per-job must be at least 1, got {args.threads_per_job}")
            torch.set_num_threads(args.threads_per_job)
    if args.cmd == "table2":  # refused before the first fraction's evaluation, not after it
        bad = [f for f in args.fractions if not 0.0 <= f < 1.0]
        if bad:
            p.error(f"--fractions must lie in [0, 1), got {', '.join(map(repr, bad))}")
    if args.cmd in ("table2", "extras") and args.num_samples < 1:
        p.error(f"--num-samples must be at least 1, got {args.num_samples}")
    from bbb.allocator import tune_allocator_by_default

    tune_allocator_by_default()  # a training process: reuse freed memory (BBB_TUNE_ALLOCATOR=0: off)
    start = time.perf_counter()
    {"table1": table1, "table2": table2, "extras": extras, "report": report}[args.cmd](args)
    print(f"[{args.cmd}] {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


def _entry() -> int:
    """``main`` as a command: an expected failure (a config the library refuses, a missing data
    directory, a run directory locked by another process) is one line, not a traceback, and
    Ctrl-C says how to continue."""
    from bbb.train import CheckpointError, TrainingDivergedError
    from bbb.train.checkpoint import RunLockedError

    name = Path(__file__).name
    try:
        return main()
    except KeyboardInterrupt:
        print(
            f"{name}: interrupted; the finished epochs are checkpointed: run the same command "
            "again to resume (finished rows are skipped)",
            file=sys.stderr,
        )
        return 130
    except (ValueError, OSError, CheckpointError, RunLockedError, TrainingDivergedError) as e:
        print(f"{name}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_entry())

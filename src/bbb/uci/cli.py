"""``bbb uci``: its command-line flags and entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig
from ..data.uci import UCIDataset, count_splits, dataset_name, find_uci_datasets
from .published import format_calibration_table, format_table
from .run import resolve_uci_root, run_all, run_uci
from .settings import (
    SearchSpace,
    UCIRunSettings,
    check_uci_settings,
    load_uci_config_file,
    parse_splits,
    uci_config,
    uci_table,
)

_FLAG_KEYS = (
    "estimator",
    "prior",
    "prior_sigma",
    "noise",
    "noise_sigma",
    "rho_init",
    "epochs",
    "lr",
    "num_samples",
    "batch_size",
    "seed",
    "device",
)


def add_parser(sub: Any) -> Any:
    """Add the ``uci`` subcommand to an argparse subparsers object; return its parser."""
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "uci",
        formatter_class=HelpFormatter,
        help="UCI regression benchmark: every split of a data set (or --all), mean and SE",
        description="Train and test on every split of a UCI data set in the split format of "
        "Hernandez-Lobato & Adams (2015). Metrics (test RMSE, test log-likelihood) are in "
        "original units. Settings: defaults < --config file < flags; --tune picks the grid "
        "point and the epoch count on a validation part of the training split.",
    )
    d = uci_config()  # the engine's defaults of the TrainConfig flags (a --config file's win)
    p.add_argument("path", nargs="?", help="split directory, or a name under DATA_DIR/uci")
    p.add_argument(
        "--all",
        nargs="?",
        const="",
        metavar="ROOT",
        help="run every data set under ROOT (default: DATA_DIR/uci) and print the table",
    )
    p.add_argument(
        "--splits",
        help="a count N (the first N splits, 0..N-1), a range a-b (one split i alone: i-i) "
        "or a list 0,3,5; integers only (default: every split)",
    )
    p.add_argument("--out", help="run directory (default: runs/uci/<name>, or runs/uci for --all)")
    p.add_argument(
        "--data-dir", help="data root holding uci/ (default: $BBB_DATA_DIR, then ../shared/data)"
    )
    p.add_argument(
        "--config",
        help="TOML/JSON file of TrainConfig keys (for --all: a folder "
        "of <name>.toml files, each optional)",
    )
    p.add_argument("--tune", action="store_true", help="validation search before the splits")
    p.add_argument("--search", help="TOML search space for --tune (default: built-in grid)")
    p.add_argument("--resume", action="store_true", help="skip splits already finished in --out")
    p.add_argument("--jobs", type=int, default=1, help="splits run in parallel processes")
    p.add_argument("--test-samples", type=int, default=100, help="weight samples at test time")
    p.add_argument("--passes", type=int, default=20, help="data passes per trainer epoch")
    p.add_argument("--no-verify", action="store_true", help="skip SHA-256 checks of shared copies")
    p.add_argument("--quiet", action="store_true", help="no per-split lines")
    p.add_argument("--estimator", help=f"reparam, local or flipout (default: {d.estimator})")
    p.add_argument("--prior", help=f"gaussian, scale_mixture or laplace (default: {d.prior})")
    p.add_argument(
        "--prior-sigma", type=float, help=f"Gaussian prior sigma (default: {d.prior_sigma:g})"
    )
    p.add_argument("--noise", help=f"fixed, learned or heteroscedastic (default: {d.noise})")
    p.add_argument(
        "--noise-sigma",
        type=float,
        help=f"(initial) noise std, normalised units (default: {d.noise_sigma:g})",
    )
    p.add_argument(
        "--rho-init",
        type=float,
        help=f"initial rho, sigma = softplus(rho) (default: {d.rho_init:g})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"epochs (with --tune: the maximum searched) (default: {d.epochs})",
    )
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {d.lr:g})")
    p.add_argument(
        "--num-samples",
        type=int,
        help=f"weight samples per training step (default: {d.num_samples})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"minibatch size, capped at the training size (default: {d.batch_size})",
    )
    p.add_argument("--seed", type=int, help=f"random seed (default: {d.seed})")
    p.add_argument("--device", help=f"torch device (default: {d.device})")
    return p


def _settings(args: Any) -> UCIRunSettings:
    if args.jobs < 1 or args.test_samples < 1 or args.passes < 1:
        raise ConfigError("--jobs, --test-samples and --passes must be >= 1")
    return UCIRunSettings(
        splits=[],
        test_samples=args.test_samples,
        passes=args.passes,
        jobs=args.jobs,
        tune=args.tune,
        search=SearchSpace.load(args.search) if args.tune else None,
    )


def main_uci(args: Any) -> int:
    """Run the ``bbb uci`` subcommand from parsed ``args``; print the results."""
    flags = {k: getattr(args, k) for k in _FLAG_KEYS}
    log = None if args.quiet else print
    verify = not args.no_verify
    if args.all is not None:
        if args.path is not None:
            raise ConfigError("give either PATH or --all ROOT, not both")
        root = args.all or None
        config_dir = Path(args.config) if args.config else None
        if config_dir is not None and not config_dir.is_dir():
            raise ConfigError(f"--config for --all must be a folder of <name>.toml: {config_dir}")

        def config_for(name: str) -> TrainConfig:
            file = None if config_dir is None else config_dir / f"{name}.toml"
            return load_uci_config_file(file if file and file.is_file() else None, **flags)

        split_counts = {
            dataset_name(d): count_splits(d)
            for d in find_uci_datasets(resolve_uci_root(root, args.data_dir))
        }

        def settings_for(name: str) -> UCIRunSettings:
            st = _settings(args)
            file = None if config_dir is None else config_dir / f"{name}.toml"
            table = uci_table(file)  # read (checked: a typo'd key) even when --splits rules
            spec = args.splits if args.splits is not None else table.get("splits")
            if spec is not None:
                n = split_counts[name]
                if (isinstance(spec, int) and not isinstance(spec, bool)) or (
                    isinstance(spec, str) and spec.strip().isascii() and spec.strip().isdigit()
                ):
                    # a count across data sets of different sizes: each set's first
                    # min(count, its splits) (protein has 5, the others 20)
                    spec = min(int(spec), n)
                st.splits = parse_splits(spec, n)
            return st

        # every data set's config file, [uci] table and split selection is read and checked
        # here, before the first data set trains: a bad file of the last one is refused now,
        # not hours into the run
        configs: dict[str, TrainConfig] = {}
        settings: dict[str, UCIRunSettings] = {}
        for name in split_counts:
            try:
                configs[name] = config_for(name)
                settings[name] = settings_for(name)
                check_uci_settings(configs[name], tuning=settings[name].tune)
            except ValueError as e:  # ConfigError, a bad split selection
                raise ConfigError(f"{name}: {e}") from e
        out = Path(args.out or "runs/uci")
        results = run_all(
            root,
            out,
            config_for=configs.__getitem__,
            settings_for=settings.__getitem__,
            data_dir=args.data_dir,
            resume=args.resume,
            verify=verify,
            log=log,
        )
        print(format_table(results), end="")
        print()
        print(format_calibration_table(results), end="")
        print(f"written: {out / 'table.md'}")
        return 0
    if args.path is None:
        raise ConfigError("bbb uci needs a data-set PATH (or --all [ROOT])")
    cfg = load_uci_config_file(args.config, **flags)
    table = uci_table(args.config)  # read (checked: a typo'd key) even when --splits rules
    dataset = UCIDataset(args.path, data_dir=args.data_dir, verify=verify)
    out = Path(args.out or f"runs/uci/{dataset.name}")
    metrics = run_uci(
        dataset.path,
        out,
        config=cfg,
        settings=_settings(args),
        splits=args.splits if args.splits is not None else table.get("splits"),
        resume=args.resume,
        verify=verify,
        log=log,
    )
    print(format_table([metrics]), end="")
    print()
    print(format_calibration_table([metrics]), end="")
    print(f"run directory: {out}")
    return 0

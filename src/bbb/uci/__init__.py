"""The UCI regression benchmark: every split of a data set, a validation search, the table.

Protocol (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016): for each split ``i`` of a
directory in the split format (`bbb.data.uci`), train on ``index_train_i`` and test on
``index_test_i``, with features and target normalised by the training statistics; one hidden
layer of ``n_hidden.txt`` ReLU units (50; 100 for protein). The test metrics are in the
*original* units of the target:

* ``rmse``: root-mean-squared error of the predictive mean ``(1/S) sum_s mu_s(x)``;
* ``ll``: mean over test points of ``log (1/S) sum_s N(y; mu_s(x), sigma_s(x)^2)``, the Gaussian
  mixture predictive over S weight samples, observation noise included
  (`bbb.metrics.mixture_gaussian_log_likelihood` with ``y_scale = y_std``: the normalised
  log-density minus ``log y_std``);
* calibration of the same mixture predictive (the same S predictions, no further random
  draws; `calibration_metrics`): ``coverage_50`` ... ``coverage_99``, the fraction of test
  targets inside the central 50/80/90/95/99% predictive interval (exact mixture quantiles),
  ``width_50`` ... ``width_99`` their mean widths (original units), ``calibration_error`` /
  ``calibration_rmse`` the mean absolute / root-mean-square deviation of the Kuleshov
  calibration curve from the diagonal (fractions), ``crps`` the mean CRPS (original units).

Over the splits, ``rmse_mean``/``ll_mean`` and the standard errors ``rmse_se``/``ll_se`` =
``std / sqrt(n)`` with the sample standard deviation (``ddof=1``; None for one split); the
calibration fields likewise under ``metrics["calibration"]`` (`summarize_calibration`). A run
resumed from splits recorded by an engine older than the calibration fields keeps those splits
(their calibration fields blank in the CSV, None in ``metrics.json``), counts only the others
in the calibration summary, and says so (log line, ``calibration.missing_splits``, a note under
the calibration table).

Nothing here is a second training loop: each split builds its network, likelihood and ELBO
from a :class:`bbb.config.TrainConfig` (`bbb.runs.build_model`, `bbb.runs.build_likelihood`)
and trains it with :class:`bbb.train.Trainer`; the test metrics come from
:func:`bbb.train.evaluate`. To keep the many epochs cheap, a "trainer epoch" is a block of
``passes`` passes over the shuffled data (`RepeatedBatches`), so per-epoch bookkeeping (and,
in the search, the validation pass) happens once per block.

A run directory (``bbb uci PATH --out RUN_DIR``) holds::

    config.json       the TrainConfig of the splits (after the search, the chosen values)
    uci.json          engine settings: data set, splits, test samples, search settings
    tune.json         --tune only: every grid point, its validation curve and the choice
    splits/split_<i>.json  one record per finished split (atomic; --resume skips these)
    splits.csv        split, rmse, ll, epochs, seconds, noise_std, chosen hyper-parameters,
                      then the calibration fields (CALIBRATION_FIELDS)
    metrics.json      rmse_mean, rmse_se, ll_mean, ll_se, calibration, per-split rows,
                      settings, timing
    splits.png        per-split test RMSE and log-likelihood; tune.png: validation curves

``run_all`` runs every data set under a root into ``RUN_DIR/<name>`` and writes ``table.md``
with our numbers next to the published ones (`PUBLISHED`), then a separate calibration
table (`format_calibration_table`).
"""

from .cli import add_parser, main_uci
from .published import (
    CALIBRATION_COLUMNS,
    PUBLISHED,
    PUBLISHED_METHODS,
    format_calibration_table,
    format_table,
    published_row,
    standard_error,
)
from .report import (
    CALIBRATION_FIELDS,
    CALIBRATION_LEVELS,
    SPLIT_FIELDS,
    summarize,
    summarize_calibration,
)
from .run import resolve_uci_root, run_all, run_uci
from .search import tune
from .settings import (
    DEFAULT_SEARCH,
    SearchSpace,
    UCIRunSettings,
    check_uci_settings,
    load_uci_config_file,
    parse_splits,
    uci_config,
    uci_table,
)
from .train import RepeatedBatches, calibration_metrics, run_split

__all__ = [
    "CALIBRATION_COLUMNS",
    "CALIBRATION_FIELDS",
    "CALIBRATION_LEVELS",
    "DEFAULT_SEARCH",
    "PUBLISHED",
    "PUBLISHED_METHODS",
    "SPLIT_FIELDS",
    "RepeatedBatches",
    "SearchSpace",
    "UCIRunSettings",
    "add_parser",
    "calibration_metrics",
    "check_uci_settings",
    "format_calibration_table",
    "format_table",
    "load_uci_config_file",
    "main_uci",
    "parse_splits",
    "published_row",
    "resolve_uci_root",
    "run_all",
    "run_split",
    "run_uci",
    "standard_error",
    "summarize",
    "summarize_calibration",
    "tune",
    "uci_config",
    "uci_table",
]

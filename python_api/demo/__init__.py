"""``sam-demo``: train and compare the SAM family on real data, in one command.

The default run needs no GPU and no internet: a small MLP learns scikit-learn's bundled digits
(1797 8x8 images, 10 classes; a fixed 1437/360 train/test split) with 30% of the training labels
replaced by a wrong class, once with the base optimizer (SGD with momentum) and once with every
optimizer of the set, for three seeds. It prints a table (test accuracy mean +- std over the
seeds, final train loss, % of SAM steps, forward/backward passes per step, wall time, and, on a
CUDA device, the speed of the fused kernels against the eager path) and writes the table as
Markdown and JSON and a PNG plot of the curves to an output folder whose path it prints last.

A user's own data: ``--data imagefolder:PATH`` (torchvision ``ImageFolder`` layout) or
``--data cifar10:PATH`` / ``--data cifar100:PATH`` (the python-format pickles, already on disk),
with ``--model resnet18`` or ``--model vit`` (torchvision / timm, when installed), on the GPU
when there is one. Nothing is ever downloaded.

Bad input (a missing or malformed data folder, an unknown optimizer, a noise rate outside
[0, 1), ...) prints one line on stderr and returns exit code 2.

The package, one module per job (each imports at run time only those above it in this list):

- ``errors``: :class:`DemoError` and how bad input is reported (one line, exit code 2);
- ``registry``: the optimizers compared (:class:`Method`, :data:`DEMO_HPARAMS`, from
  python_api/optimizer_table.py), the ``--optimizers`` / ``--rho`` parsers, building one;
- ``data``: digits, CIFAR and ImageFolder loaders, label noise;
- ``models``: the MLP, the small CNN, ResNet-18 / ViT;
- ``train``: one (optimizer, seed) run;
- ``timing``: fused vs eager step time on CUDA;
- ``report``: table rows, the Markdown table, the plot, the sharpness table, the output folder;
- ``compare``: one comparison over optimizers and seeds (:func:`run`);
- ``cli``: the argument parser and :func:`main`, the ``sam-demo`` entry point.

The names below are this package's interface (``from python_api import demo; demo.main(...)``,
``sam-demo = "python_api.demo:main"``). The run reads :func:`optimizer_registry` through this
package, so replacing ``demo.optimizer_registry`` (as a test does) reaches it.
"""

from python_api.demo.cli import build_parser, main
from python_api.demo.compare import DIGITS_DEFAULTS, IMAGE_DEFAULTS, run
from python_api.demo.data import (
    Data,
    add_label_noise,
    load_cifar,
    load_data,
    load_digits_data,
    load_image_folder,
    noisy_labels,
)
from python_api.demo.errors import EXIT_USAGE, PROG, DemoError
from python_api.demo.models import (
    MLP,
    MODELS,
    SmallCNN,
    build_model,
    check_model_available,
    resolve_model_name,
)
from python_api.demo.registry import (
    BASE_ALIASES,
    DEMO_HPARAMS,
    Method,
    _optimizer_missing,
    base_optimizer,
    load_optimizer_class,
    make_optimizer,
    method_kwargs,
    optimizer_registry,
    parse_optimizers,
    parse_rho_overrides,
)
from python_api.demo.report import (
    default_out_dir,
    render_table,
    save_plot,
    sharpness_table,
    summarise,
)
from python_api.demo.timing import fused_vs_eager
from python_api.demo.train import RunConfig, RunResult, evaluate, steps_per_epoch, train_one

__all__ = [
    "BASE_ALIASES",
    "DEMO_HPARAMS",
    "DIGITS_DEFAULTS",
    "EXIT_USAGE",
    "IMAGE_DEFAULTS",
    "MLP",
    "MODELS",
    "PROG",
    "Data",
    "DemoError",
    "Method",
    "RunConfig",
    "RunResult",
    "SmallCNN",
    "_optimizer_missing",
    "add_label_noise",
    "base_optimizer",
    "build_model",
    "build_parser",
    "check_model_available",
    "default_out_dir",
    "evaluate",
    "fused_vs_eager",
    "load_cifar",
    "load_data",
    "load_digits_data",
    "load_image_folder",
    "load_optimizer_class",
    "main",
    "make_optimizer",
    "method_kwargs",
    "noisy_labels",
    "optimizer_registry",
    "parse_optimizers",
    "parse_rho_overrides",
    "render_table",
    "resolve_model_name",
    "run",
    "save_plot",
    "sharpness_table",
    "steps_per_epoch",
    "summarise",
    "train_one",
]

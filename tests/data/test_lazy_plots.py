"""flwr-datasets' plotting helpers load only when used (fedpeft.data.lazy_plots)."""

from __future__ import annotations

import subprocess
import sys


def test_partitioners_import_without_plotting_libraries_and_plots_still_load():
    code = (
        "import sys\n"
        "import fedpeft.data.partition\n"
        "assert 'seaborn' not in sys.modules and 'matplotlib.pyplot' not in sys.modules, 'plots imported'\n"
        "import flwr_datasets\n"
        "f = flwr_datasets.visualization.plot_label_distributions\n"
        "assert f.__module__.startswith('flwr_datasets.visualization.'), f.__module__\n"
        "from flwr_datasets.visualization import plot_comparison_label_distribution\n"
        "assert 'seaborn' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]

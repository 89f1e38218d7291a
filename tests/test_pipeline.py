"""The wiring's seed for result UIDs: stable across processes, sensitive to what matters."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from medcam.pipeline import ExplainSettings, result_seed, series_case_name
from medcam.runner import parse_target

CODE = """
from types import SimpleNamespace
from medcam.pipeline import ExplainSettings, result_seed
from medcam.runner import parse_target
scan = SimpleNamespace(datasets=[], sha256="abc")
print(result_seed(scan, "w", ExplainSettings(target=parse_target("seg:1"))))
"""


def test_seed_is_the_same_in_another_process():
    scan = SimpleNamespace(datasets=[], sha256="abc")
    here = result_seed(scan, "w", ExplainSettings(target=parse_target("seg:1")))
    there = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                           check=True).stdout.strip()  # fmt: skip
    assert here == there
    assert "0x" not in str(ExplainSettings(target=parse_target("seg:1")).record())


def test_seed_depends_on_sources_model_and_settings_not_formats():
    import pydicom

    def scan(*uids):
        return SimpleNamespace(datasets=[pydicom.Dataset() for _ in uids], sha256="x")

    a = scan("1.1", "1.2")
    for ds, uid in zip(a.datasets, ("1.1", "1.2"), strict=True):
        ds.SOPInstanceUID = uid
    b = scan("1.2", "1.1")  # the same instances in another order
    for ds, uid in zip(b.datasets, ("1.2", "1.1"), strict=True):
        ds.SOPInstanceUID = uid
    base = result_seed(a, "w", ExplainSettings())
    assert result_seed(b, "w", ExplainSettings()) == base
    assert result_seed(a, "w", ExplainSettings(formats=["dicom-pm"])) == base
    assert result_seed(a, "w2", ExplainSettings()) != base
    assert result_seed(a, "w", ExplainSettings(method="layercam")) != base
    assert result_seed(a, "w", ExplainSettings(target=1)) != base
    c = scan("1.1")
    c.datasets[0].SOPInstanceUID = "1.1"
    assert result_seed(c, "w", ExplainSettings()) != base


def test_case_names_hold_no_uid():
    name = series_case_name("1.2.840.113619.2.55.3.1234")
    assert name.startswith("series-") and "1.2.840" not in name and len(name) == 19

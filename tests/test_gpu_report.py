"""The GPU check's report (tools/gpu_report.py) on hand-written gpu_check outputs: counts, speed-ups and the
fast-pair verdict."""

import json
import os

from sparse_detr.engine.studies import gpu_report

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_ops_cuda" name="test_cuda_kernel_is_built[default]"/>
<testcase classname="tests.test_ops_cuda" name="test_cuda_kernel_is_built[fast]"/>
<testcase classname="tests.test_ops_cuda" name="test_cuda_kernel_matches_reference[default-bf16]"/>
<testcase classname="tests.test_ops_cuda" name="test_cuda_kernel_matches_reference[fast-bf16]">
<failure message="boom"/></testcase>
</testsuite></testsuites>"""


def _write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def test_report_counts_tests_per_pair_and_computes_speedups(tmp_path):
    out = str(tmp_path)
    _write(out, "gpu.txt", "NVIDIA H200, 570.00, 143771 MiB")
    _write(out, "stages.tsv", "build\t0\t95\ntests\t1\t60\n")
    _write(out, "tests_cuda.xml", JUNIT)
    rows = [{"case": "decoder", "queries": 300, "implementation": impl, "dtype": "bfloat16",
             "coord_dtype": "float32", "forward_ms": f, "forward_backward_ms": b, "device": "H200"}
            for impl, f, b in (("reference", 4.0, 12.0), ("cuda default", 0.3, 1.2), ("cuda fast", 0.1, 0.4))]
    _write(out, "op_bfloat16.json", json.dumps(rows))
    _write(out, "model_bf16_fast.json", json.dumps([{"name": "sparse_detr_r50_rho0.1", "rho": 0.1,
                                                     "fps_bs1": 20.0, "fps_bs4": 50.0}]))
    report, md = gpu_report.build_report(out)

    assert report["tests"]["total"] == {"passed": 3, "failed": 1, "skipped": 0}
    assert report["tests"]["per_pair"]["default"] == {"passed": 2, "failed": 0, "skipped": 0}
    assert report["tests"]["per_pair"]["fast"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert report["fast_passed_every_test"] is False
    assert "| decoder | 300 | 4.000 / 12.000 | 0.300 / 1.200 | 0.100 / 0.400 | 3.00x | 3.00x |" in md
    assert "(locations/weights float32)" in md and "| sparse_detr_r50_rho0.1 | 0.1 | fast | 20.0 | 50.0 |" in md
    assert "NVIDIA H200" in md and "| tests | 1 | 60 |" in md
    assert json.load(open(os.path.join(out, "report.json")))["op"]["bfloat16"][2]["forward_ms"] == 0.1
    assert open(os.path.join(out, "report.md")).read().strip() == md.strip()

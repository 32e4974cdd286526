"""One fixed, small CPU thread count for every test process (and the subprocesses the tests start).

Why: on a machine that other jobs keep busy, an OpenMP team of several threads per process waits at every
parallel region for threads the OS has descheduled, and the suite ran 11x slower than idle (test_overfit: 474 s
instead of 9 s). One thread per process degrades gracefully and makes float reductions run in one fixed order.
SPARSE_DETR_TEST_THREADS overrides the count (e.g. to 2 on an idle machine).
"""
import os

THREADS = os.environ.get("SPARSE_DETR_TEST_THREADS", "1")
# Before torch is imported: OpenMP reads these once. Subprocesses (torchrun, the tools) inherit them.
for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[name] = THREADS

import torch  # noqa: E402

torch.set_num_threads(int(THREADS))

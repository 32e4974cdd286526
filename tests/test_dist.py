"""A collective that waits for a stopped process ends, after train.collective_timeout_s, with a message that names
the waiting rank and the collective (two gloo processes; the second never joins the step's all-reduce, as a
process stopped by SIGSTOP would not)."""
import os
import socket

import torch

from sparse_detr.engine import dist as sd_dist


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    sd_dist.init_from_env("cpu", timeout_s=2.0)
    try:
        sd_dist.all_reduce_mean(torch.ones(3))  # both ranks: fine
        if rank == 0:
            try:
                sd_dist.all_reduce_mean(torch.ones(3), "the training step's loss terms")  # rank 1 never comes
                queue.put((rank, "no error"))
            except sd_dist.CollectiveTimeoutError as e:
                queue.put((rank, str(e)))
        else:
            queue.put((rank, "stopped"))
            import time

            time.sleep(3.5)  # "stopped": past rank 0's 2 s timeout, then leaves
    finally:
        try:
            sd_dist.cleanup()
        except Exception:  # noqa: BLE001 - the group may be broken by the timeout
            pass


def test_a_stalled_collective_names_the_rank_and_the_collective():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    messages = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert messages[1] == "stopped"
    assert "rank 0 of 2 waited 2 s in all_reduce (the training step's loss terms)" in messages[0], messages[0]
    assert "train.collective_timeout_s" in messages[0] and "--resume auto" in messages[0]

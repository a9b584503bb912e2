"""DistributedDataParallel: two processes on the gloo backend train fused_lstm.LSTM and nn.LSTM side by side
and end with the same parameters."""

import datetime
import io
import multiprocessing
import queue
import socket
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fused_lstm

WORLD = 2
STEPS = 3
TIMEOUT_S = 120


class Model(nn.Module):
    def __init__(self, lstm_class):
        super().__init__()
        self.lstm = lstm_class(3, 5, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(10, 1, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


def train(rank, lstm_class):
    """A few SGD steps under DDP on this rank's own data; returns the final parameters."""
    torch.manual_seed(0)  # the same initial weights for both classes (DDP broadcasts rank 0's anyway)
    model = DistributedDataParallel(Model(lstm_class))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(4, 6, 3, generator=data, dtype=torch.float64)
        y = torch.randn(4, 1, generator=data, dtype=torch.float64)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.module.named_parameters()}


def worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))  # fmt: skip
    try:
        # As bytes: a tensor put on a multiprocessing queue is shared memory, gone once this process exits.
        buffer = io.BytesIO()
        torch.save((train(rank, nn.LSTM), train(rank, fused_lstm.LSTM)), buffer)
        results.put((rank, buffer.getvalue()))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect(results, processes):
    """Each worker's result, until all are in, a worker has failed, or the time is up."""
    received, deadline = [], time.monotonic() + TIMEOUT_S
    while len(received) < len(processes) and time.monotonic() < deadline:
        try:
            received.append(results.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in processes):
                break
    return received


def test_ddp_trains_like_nn_lstm():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, results)) for rank in range(WORLD)]
    for p in processes:
        p.start()
    try:
        received = collect(results, processes)
    finally:
        for p in processes:
            p.join(timeout=TIMEOUT_S)
            if p.is_alive():
                p.kill()
    assert len(received) == WORLD and [p.exitcode for p in processes] == [0] * WORLD, [p.exitcode for p in processes]
    outcome = {rank: torch.load(io.BytesIO(data)) for rank, data in received}
    torch.manual_seed(0)
    initial = dict(Model(nn.LSTM).named_parameters())  # what train() starts from
    for rank, (ref, ours) in outcome.items():
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], atol=1e-10, rtol=1e-10, msg=f"rank {rank}: {name}")
            torch.testing.assert_close(ours[name], outcome[0][1][name], atol=0, rtol=0)  # DDP kept ranks equal
        assert all(not torch.equal(ref[name], initial[name]) for name in ref), "training moved every weight"

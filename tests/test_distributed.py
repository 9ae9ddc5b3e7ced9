"""A converted model under DistributedDataParallel: 2 processes with gloo on
the CPU end with the parameters of single-process training on the same global
batches (and NCCL on the GPUs where there are some)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import pyconvext

STEPS, BATCH = 4, 8


class ConvLSTMNet(torch.nn.Module):
    """Every swapped module in one net: rows of conv features as an LSTM's steps."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.lstm = torch.nn.LSTM(4 * 6, 10, batch_first=True)
        self.cell = torch.nn.LSTMCell(10, 10)
        self.out = torch.nn.Linear(10, 3)

    def forward(self, x):
        rows = self.pool(torch.relu(self.conv(x)))  # N, 4, 6, 6
        steps = rows.permute(0, 2, 1, 3).flatten(2)  # N, 6 steps, 24
        output, (h, c) = self.lstm(steps)
        h, _ = self.cell(output[:, -1], (h[0], c[0]))
        return self.out(h)


def _batches(device):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 12, 12, generator=gen, dtype=torch.float64).to(device),
             torch.randint(0, 3, (BATCH,), generator=gen).to(device)) for _ in range(STEPS)]


def _train(model, batches, shard=slice(None)):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        optimizer.step()


def _net(device):
    torch.manual_seed(0)
    return ConvLSTMNet().double().to(device)


def _rank(rank, world, backend, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        # Wrapped first, converted through the wrapper.
        ddp = pyconvext.convert(DistributedDataParallel(_net(device), device_ids=[rank] if backend == "nccl" else None))
        assert type(ddp.module.conv) is pyconvext.nn.Conv2d and type(ddp.module.pool) is pyconvext.nn.MaxPool2d
        # pyconvext has no CUDA LSTM kernels yet: convert keeps native's there.
        ours = device.type == "cpu"
        lstm, cell = (pyconvext.nn.LSTM, pyconvext.nn.LSTMCell) if ours else (torch.nn.LSTM, torch.nn.LSTMCell)
        assert type(ddp.module.lstm) is lstm and type(ddp.module.cell) is cell
        per_rank = BATCH // world
        _train(ddp, _batches(device), slice(rank * per_rank, (rank + 1) * per_rank))
        if rank == 0:
            torch.save({k: v.cpu() for k, v in ddp.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", [
    "gloo", pytest.param("nccl", marks=pytest.mark.cuda)])
def test_ddp_matches_single_process(backend, tmp_path):
    device = "cuda" if backend == "nccl" else "cpu"
    # NCCL takes one GPU per process.
    world = min(2, torch.cuda.device_count()) if backend == "nccl" else 2
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(world, backend, _free_port(), str(out)), nprocs=world, join=True)

    reference = pyconvext.convert(_net(device))
    _train(reference, _batches(device))
    trained = torch.load(out, weights_only=True)
    assert list(trained) == list(reference.state_dict())
    initial = _net("cpu").state_dict()
    for name, value in reference.state_dict().items():
        assert not torch.equal(trained[name], initial[name])  # it trained
        torch.testing.assert_close(trained[name], value.cpu(), msg=name)

"""Communication pieces for sequence parallelism: a differentiable all-to-all, ring exchange
with batched isend/irecv, shape agreement checks and the 2-D process-group layout."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def global_rank(group, rank_in_group: int) -> int:
    """The global rank of ``rank_in_group``; P2P ops address peers by global rank."""
    if group is None or group is dist.group.WORLD:
        return rank_in_group
    return dist.get_global_rank(group, rank_in_group)


def require_member(group, what: str) -> None:
    """Refuse a group this rank is not in: torch reports its size and rank as -1, so the ring
    would run no step and return zeros, and the all-to-all would fail with an opaque error.
    Only this rank raises, and the group's members wait for no one: it takes no part in their
    collectives."""
    if group is not None and group is not dist.group.WORLD and dist.get_rank(group) < 0:
        # no ranks in the message: new_group hands every non-member one shared placeholder group
        raise ValueError(f"{what}: this rank (global rank {dist.get_rank()}) is not a member of group; only the "
                         f"ranks passed to new_group for it may call {what.split(' ')[0]} with it")


# dtypes travel in the shape agreement as their index here (the rest of a row is sizes)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_same_shapes(what: str, shapes: dict, group, device, *, rule: Optional[str] = None) -> None:
    """Raise one ValueError on every rank when the ranks disagree on ``shapes`` (name -> int, or a
    torch.dtype: ranks whose shards differ in dtype exchange buffers of different byte sizes).
    ``rule``: what the values must agree for, in the message (default: the shards' shapes).

    Uneven shards would otherwise make the collectives hang or fail with an opaque error (gloo
    aborts the process on a dtype mismatch); one small all_gather of a few integers is cheap next
    to the attention it protects.
    """
    world = group_size(group)
    if world == 1:
        return
    names = list(shapes)
    codes = [_DTYPES.index(shapes[n]) if isinstance(shapes[n], torch.dtype) else int(shapes[n]) for n in names]
    mine = torch.tensor(codes, dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    rows = [t.tolist() for t in got]
    if any(r != rows[0] for r in rows):
        def shown(n, v):
            return str(_DTYPES[v]).replace("torch.", "") if isinstance(shapes[n], torch.dtype) else v
        table = "; ".join(f"rank {i}: " + ", ".join(f"{n}={shown(n, v)}" for n, v in zip(names, r))
                          for i, r in enumerate(rows))
        if rule is not None:
            raise ValueError(f"{what}: {rule}; got {table}")
        raise ValueError(f"{what}: every rank of the group must hold a shard of the same shape and dtype; "
                         f"got {table}. "
                         f"Padding the sequence to a multiple of the group size (twice it for zigzag) is "
                         f"exact only for causal self-attention padded at its end (drop the padded rows of "
                         f"the output): without causal every padded key takes part in every row's softmax")


# -- all-to-all with a backward ---------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # (P, ...) chunk j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)                   # chunk i came from rank i


class _AllToAll(torch.autograd.Function):
    """Scatter ``scatter_dim`` over the group, gather ``gather_dim``. The adjoint of this
    exchange is the same exchange with the two dims swapped (rank j's received chunk i is
    rank i's sent chunk j), so backward is one more all-to-all."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        # through apply, not the bare exchange: under create_graph the gradient stays connected, so a
        # double backward reaches the local attention's own (refusing) double backward instead of
        # treating this gradient as a constant that a gradient penalty would silently drop
        return _AllToAll.apply(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: split ``x`` along ``scatter_dim`` into P chunks, send chunk j
    to rank j, concatenate the chunks received along ``gather_dim`` in rank order."""
    if x.shape[scatter_dim] % group_size(group):
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} does not split "
                         f"into {group_size(group)} equal parts")
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


# -- ring exchange ----------------------------------------------------------------------------
def post_exchange(ops: Sequence[dist.P2POp]):
    """Post a batch of isend/irecv and return the requests (a seam the tests instrument)."""
    return dist.batch_isend_irecv(list(ops))


def wait_all(reqs) -> None:
    for r in reqs:
        r.wait()


class RingExchange:
    """Send tensors to the next rank and receive same-shaped ones from the previous rank.

    Every rank posts its sends and receives in the same order, which is what both NCCL
    (ordered per communicator) and gloo (matched per peer and tag) need.
    """

    def __init__(self, group, *, tag: int = 0) -> None:
        self.group, self.tag = group, tag
        world, rank = group_size(group), group_rank(group)
        self.next = global_rank(group, (rank + 1) % world)
        self.prev = global_rank(group, (rank - 1) % world)
        self._reqs = None

    @property
    def pending(self) -> bool:
        return self._reqs is not None

    def start(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Post the exchange; returns the receive buffers (valid after :meth:`wait`)."""
        assert self._reqs is None, "previous ring exchange not waited for"
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, self.tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group, self.tag) for b in recv]
        self._reqs = post_exchange(ops)
        return recv

    def wait(self) -> None:
        if self._reqs is not None:
            wait_all(self._reqs)
            self._reqs = None


# -- process groups ---------------------------------------------------------------------------
class SPGroups(NamedTuple):
    """The groups of this rank in the 2-D layout: within its SP block of ulysses_size x ring_size
    ranks, rank in block = ring_rank * ulysses_size + ulysses_rank."""

    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    ulysses_rank: int
    ring_rank: int


def make_groups(ulysses_size: int, ring_size: int, *, backend: Optional[str] = None) -> SPGroups:
    """Build the USP layout on the default group; every rank must call it (new_group is collective).

    The world is tiled with SP blocks of ulysses_size x ring_size consecutive ranks (block b holds
    global ranks [b U R, (b+1) U R); the blocks are the data- or CFG-parallel replicas, one block
    when U R is the world size). Inside a block, Ulysses groups are runs of consecutive ranks (keep
    them inside one machine: the all-to-all is the heavy exchange), ring groups stride across them
    (one K/V pass per step suits the slower links between machines).
    """
    for name, n in (("ulysses_size", ulysses_size), ("ring_size", ring_size)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not dist.is_initialized():
        raise RuntimeError("make_groups needs torch.distributed to be initialised (init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    block = ulysses_size * ring_size
    if world % block:
        raise ValueError(f"make_groups: ulysses_size x ring_size = {ulysses_size} x {ring_size} = {block} "
                         f"must divide the world size {world} (the world is tiled with SP blocks of that size)")
    mine_u = mine_r = None
    for base in range(0, world, block):  # every rank creates every group, in one order
        for r in range(ring_size):
            ranks = [base + r * ulysses_size + u for u in range(ulysses_size)]
            g = dist.new_group(ranks, backend=backend)
            if rank in ranks:
                mine_u = g
        for u in range(ulysses_size):
            ranks = [base + r * ulysses_size + u for r in range(ring_size)]
            g = dist.new_group(ranks, backend=backend)
            if rank in ranks:
                mine_r = g
    in_block = rank % block
    return SPGroups(ulysses=mine_u, ring=mine_r, ulysses_rank=in_block % ulysses_size,
                    ring_rank=in_block // ulysses_size)


def group_ranks(group) -> list[int]:
    """The global ranks of ``group`` (None: the world)."""
    return dist.get_process_group_ranks(dist.group.WORLD if group is None else group)

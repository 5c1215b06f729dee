"""ATC: the clustering against a member-by-member oracle (fp64, exact) and scikit-learn, properties,
the custom op under Dynamo, model parity, errors."""

from __future__ import annotations

import pytest
import torch

import tomec
from tests.helpers import (
    TOLERANCE, check_parity, compile_tomec, images, make_model, reference_of, relative_error, tie_metric,
    uninitialized_memory_poisoned,
)
from tomec import reference
from tests.oracles import atc as atc_oracle
from tests.oracles import tome as tome_oracle
from tomec import methods
from tomec.config import TomecConfig
from tomec.errors import ConfigError, ScheduleError
from tomec.ops import atc_cluster, atc_default_blocks, atc_match

SHAPES = [(5, 0), (6, 1), (9, 2), (12, 3), (14, 4), (17, 5)]


def rs(n, protected):
    cap = n - protected - 1
    return sorted({0, 1, cap // 2, cap})


def _metric(batch, n, seed, d=6):
    return torch.randn(batch, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


LINKAGES = ["average", "complete", "single"]


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("n,protected", SHAPES)
def test_equals_oracle(n, protected, linkage):
    metric = _metric(2, n, seed=n)
    for r in rs(n, protected):
        got = atc_match(metric, r, protected, linkage=linkage)
        assert torch.equal(got, atc_oracle.atc_match(metric, r, protected, linkage)), r


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("n,protected", [(11, 1), (16, 0), (13, 3)])
def test_ties_equal_oracle(n, protected, linkage):
    # 0/1 tokens with four ones: distances are multiples of 1/4 and every linkage sum is exact, so
    # linkages tie exactly and only the (i, j) order decides
    metric = tie_metric(3, n, seed=n)
    for r in rs(n, protected):
        got = atc_match(metric, r, protected, linkage=linkage)
        assert torch.equal(got, atc_oracle.atc_match(metric, r, protected, linkage)), r


def test_linkages_differ():
    # a chain 0 - 1 - 2 at unit steps and a pair 3, 4 at 1.5: single linkage joins the chain first
    # (its clusters are 1 apart), complete linkage the pair (the chain's ends are 2 apart)
    pos = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.5], dtype=torch.float64)
    dist = (pos.view(-1, 1) - pos.view(1, -1)).abs()[None]
    assert atc_cluster(dist, 2, "single").tolist() == [[0, 0, 0, 1, 2]]
    assert atc_cluster(dist, 2, "complete").tolist() == [[0, 0, 1, 2, 2]]
    # average: the chain's 1.5 ties the pair's 1.5; the smaller pair (0, 2) wins
    assert atc_cluster(dist, 2, "average").tolist() == [[0, 0, 0, 1, 2]]
    with pytest.raises(ConfigError, match="linkage must be one of average, complete, single"):
        atc_match(torch.randn(1, 5, 4), 2, 1, linkage="ward")


def test_tie_breaking_by_the_smallest_pair():
    # four identical points: every distance is 0, so merges go (0,1), (0,2), (0,3) in that order
    dist = torch.zeros(1, 4, 4, dtype=torch.float64)
    assert atc_cluster(dist, 1, "average").tolist() == [[0, 0, 1, 2]]
    assert atc_cluster(dist, 2, "average").tolist() == [[0, 0, 0, 1]]
    # points 2 and 3 tie with points 0 and 1 at distance 1; (0, 1) comes first in row-major order
    d = torch.tensor([[0, 1, 5, 5], [1, 0, 5, 5], [5, 5, 0, 1], [5, 5, 1, 0]], dtype=torch.float64)
    assert atc_cluster(d[None], 1, "average").tolist() == [[0, 0, 1, 2]]
    assert atc_cluster(d[None], 2, "average").tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("n_clusters", [2, 5, 9, 17])
def test_agrees_with_scikit_learn(n_clusters, linkage):
    from sklearn.cluster import AgglomerativeClustering

    metric = _metric(3, 24, seed=n_clusters, d=8)
    dest = atc_match(metric, 24 - n_clusters, 0, linkage=linkage)
    for b in range(3):
        labels = AgglomerativeClustering(
            n_clusters=n_clusters, linkage=linkage, metric="cosine"
        ).fit(metric[b].numpy()).labels_
        # the same partition: the same pairs share a cluster
        ours = dest[b].view(-1, 1) == dest[b].view(1, -1)
        theirs = torch.from_numpy(labels).view(-1, 1) == torch.from_numpy(labels).view(1, -1)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("n,protected", SHAPES)
def test_properties(n, protected):
    metric = _metric(3, n, seed=n + 100)
    x = torch.randn(3, n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n + 200))
    for r in rs(n, protected):
        dest = atc_match(metric, r, protected)
        assert dest.shape == (3, n) and dest.dtype == torch.int64
        n_out = n - r
        for b in range(3):
            assert sorted(set(dest[b].tolist())) == list(range(n_out))  # every slot non-empty
            assert dest[b, :protected].tolist() == list(range(protected))  # protected first, alone
            assert bool((dest[b, protected:] >= protected).all())  # nothing merges into them
            # clusters numbered by their lowest member: first appearances come in slot order
            first = [int(s) for i, s in enumerate(dest[b]) if int(s) not in dest[b, :i].tolist()]
            assert first == list(range(n_out))
        x_out, size = tomec.ops.merge(x, None, dest, n_out)
        assert torch.equal(size.sum(1), torch.full((3, 1), float(n), dtype=torch.float64))
        assert torch.equal(x_out[:, :protected], x[:, :protected])
        x_ref, size_ref = tome_oracle.merge(x, None, dest, n_out)
        assert torch.allclose(x_out, x_ref, rtol=1e-12, atol=1e-12) and torch.equal(size, size_ref)
    assert torch.equal(atc_match(metric, 0, protected), torch.arange(n).expand(3, n))


def test_keys_are_averaged_over_heads_and_batch_is_independent():
    keys = torch.randn(3, 4, 15, 8, dtype=torch.float64)
    dest = atc_match(keys, 6, 1)
    assert torch.equal(dest, atc_match(keys.mean(1), 6, 1))
    for b in range(3):
        assert torch.equal(dest[b : b + 1], atc_match(keys[b : b + 1], 6, 1))


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_clustering_is_deterministic(linkage):
    """The same labels with uninitialized memory poisoned and from strided keys.

    Calling the op twice in one process cannot fail on CPU: the merge loop runs the same tensor ops on
    the same values, and memory it forgot to write holds the same stale values on the second call.
    The second run here fills every uninitialized allocation with NaN / the largest integer (torch's
    deterministic mode, which also raises on ops torch knows to be nondeterministic; the loop writes
    its rows and columns with indexed assignment) and takes the keys strided as timm's ``qkv.unbind``
    gives them. The keys are small integers: exact distances, many tied pairs, so the labels cannot
    depend on how a layout orders a sum, and every tie goes through the row-major rule.
    """
    g = torch.Generator().manual_seed(4)
    qkv = torch.randint(-2, 3, (3, 40, 3, 4, 8), generator=g).float()
    keys = qkv.permute(2, 0, 3, 1, 4)[1]  # [B, H, N, d], strided
    first = [atc_match(keys.contiguous(), r, 1, linkage=linkage) for r in (1, 20, 38)]
    with uninitialized_memory_poisoned():
        again = [atc_match(keys, r, 1, linkage=linkage) for r in (1, 20, 38)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_custom_op_fake_and_dynamo():
    torch.library.opcheck(torch.ops.tomec.atc_cluster.default, (torch.rand(2, 7, 7), 3, "average"))
    metric = torch.randn(2, 20, 8)

    def f(m):
        return atc_match(m, 9, 1)

    torch._dynamo.reset()
    graph_ops = []

    def backend(gm, example_inputs):
        graph_ops.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    out = torch.compile(f, backend=backend, fullgraph=True)(metric)
    assert torch.equal(out, f(metric))
    assert sum("atc_cluster" in t for t in graph_ops) == 1  # one node, not 9 unrolled steps


def test_keep_rate_schedule_is_the_official_cluster_count():
    # int(196 · ρ^k) clusters at the k-th reduction block (blocks 3, 6, 9 of DeiT's 12)
    for rho, kept in [(0.9, [176, 158, 142]), (0.7, [137, 96, 67]), (0.5, [98, 49, 24]), (0.25, [49, 12, 3])]:
        schedule = TomecConfig(method="atc", method_options={"keep_rate": rho}).resolve_schedule(12, 197, 1)
        counts = [196 - sum(schedule[: b + 1]) for b in (3, 6, 9)]
        assert counts == kept, rho
        assert [i for i, v in enumerate(schedule) if v] == [3, 6, 9]


def test_default_blocks_and_cap():
    assert atc_default_blocks(12) == [3, 6, 9]  # the official --reduction_loc 3 6 9 (0-based)
    assert atc_default_blocks(24) == [6, 12, 18]
    assert atc_default_blocks(6) == [1, 3, 4]
    assert atc_default_blocks(2) == [0, 1] and atc_default_blocks(1) == [0]
    assert methods.get("atc").cap(197, 1) == 195 and methods.get("atc").cap(1, 1) == 0
    a, b, c = tomec.schedule.spread(195, 3, -0.5)  # all 196 patches but one cluster: within the cap
    assert TomecConfig(method="atc", r=195).resolve_schedule(12, 197, 1) == (
        [0, 0, 0, a, 0, 0, b, 0, 0, c, 0, 0]
    )
    assert TomecConfig(method="atc", r=10, method_options={"blocks": (4,)}).resolve_schedule(
        6, 101, 1
    ) == [0, 0, 0, 0, 10, 0]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: atc_match(torch.randn(1, 9, 4), 8, 1), ConfigError, r"r=8 is outside \[0, 7\] for 9 tokens with 1"),
        (lambda: atc_match(torch.randn(1, 9, 4), -1, 0), ConfigError, r"r=-1 is outside"),
        (lambda: atc_match(torch.randn(1, 9, 4), 1, 10), ConfigError, r"protected=10 is outside"),
        (lambda: atc_match(torch.randn(9, 4), 1, 0), ConfigError, "metric must be"),
        (lambda: TomecConfig(method="atc", r=5, method_options={"blocks": [1, 1]}), ConfigError, "twice"),
        (lambda: TomecConfig(method="atc", r=5, method_options={"blocks": "3"}), ConfigError, "list of block"),
        (lambda: TomecConfig(method="atc", r=5, method_options={"blocks": [2, 7]}).resolve_schedule(6, 101, 1),
         ScheduleError, r"block\(s\) \[7\] do not exist; the model has 6"),
        (lambda: TomecConfig(method="atc", r=100).resolve_schedule(6, 101, 1), ScheduleError,
         r"at most 99 of the 100 mergeable tokens"),
        (lambda: TomecConfig(method="atc", r=5, method_options={"linkage": "ward"}), ConfigError,
         "linkage must be one of average, complete, single, got 'ward'"),
        (lambda: TomecConfig(method="atc", method_options={"keep_rate": 1.5}), ConfigError,
         r"keep_rate must be a number in \(0, 1\], got 1.5"),
        (lambda: TomecConfig(method="atc", r=5, method_options={"keep_rate": 0.5}), ConfigError,
         "takes its schedule from its options"),
        (lambda: TomecConfig(method="atc", method_options={"keep_rate": 0.1}).resolve_schedule(12, 197, 1),
         ConfigError, r"keeps int\(196 \* 0.1\^3\) = 0 clusters at reduction block 9"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# one case here (the suite is short on CPU); test_coverage/test_frameworks add more models
@pytest.mark.parametrize("fused,batch,prop_attn", [(False, 2, True)])
def test_model_parity(fused, batch, prop_attn):
    _, _, be, _, _ = check_parity("test_vit", fused, batch, prop_attn, method="atc", r=60,
                                  trace_source=True)
    assert be.schedule == [0, 30, 0, 20, 10, 0]


def test_model_parity_complete_linkage_and_keep_rate():
    # the DeiT setting of the official README: complete linkage, a keep rate (cluster counts)
    _, _, be, _, _ = check_parity("test_vit", True, 2, True, method="atc", r=60, linkage="complete")
    model = make_model("test_vit", True)
    x = images("test_vit", 2)
    compiled, be = compile_tomec(model, method="atc", r=None, linkage="single", keep_rate=0.7)
    ref = reference_of(model, method="atc", linkage="single", keep_rate=0.7)
    with torch.no_grad():
        out, want, other = compiled(x), ref(x), reference_of(model, method="atc", keep_rate=0.7)(x)
    assert be.schedule == reference.state(ref).schedule and be.tokens_per_block[-1] == 1 + int(100 * 0.7**3)
    assert relative_error(out, want) <= TOLERANCE
    assert relative_error(other, want) > 100 * TOLERANCE  # single and average linkage differ

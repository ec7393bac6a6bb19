"""Window averaging and guidance collection: results independent of the order of arrival."""

import itertools

import pytest
import torch

from apt_dist.executor import DeferredPatches, Guidance, guide, make_units, patch_shapes
from apt_dist.fusion import WindowAverage
from apt_dist.geometry import Window


def _windows():
    return [Window(0, 0, 4, 4), Window(0, 2, 4, 4), Window(2, 1, 4, 4), Window(1, 1, 4, 4)]


def test_window_average_is_bit_identical_for_every_arrival_order():
    g = torch.Generator().manual_seed(0)
    windows = _windows()
    views = [torch.randn(3, 4, 4, generator=g) * 1e3 for _ in windows]  # large values: order would show
    results = []
    for order in itertools.permutations(range(len(windows))):
        avg = WindowAverage(3, 7, 7, windows)
        for k in order:
            avg.add(k, views[k])
        results.append(avg.result())
    assert all(torch.equal(r, results[0]) for r in results)

    value, count = torch.zeros(3, 7, 7), torch.zeros(1, 7, 7)
    for win, v in zip(windows, views):
        ys, xs = win.slices()
        value[:, ys, xs] += v
        count[:, ys, xs] += 1
    assert torch.equal(results[0], value / count.clamp(min=1))
    assert torch.equal(results[0][:, 6, :], torch.zeros(3, 7))  # row 6 is covered by no window
    assert torch.equal(avg.result(slice(1, 5), slice(2, 7)), results[0][:, 1:5, 2:7])  # a region: the same values


def test_window_average_counts_the_cover_up_front():
    avg = WindowAverage(3, 7, 7, _windows())
    assert torch.equal(avg.count[0, 0], torch.tensor([1.0, 1, 2, 2, 1, 1, 1]))  # counted before any window (0 -> 1)
    assert torch.equal(WindowAverage(3, 2, 2, []).result(), torch.zeros(3, 2, 2))  # no windows: nothing covered


def test_window_average_refuses_a_missing_window():
    avg = WindowAverage(3, 6, 7, _windows())
    avg.add(0, torch.ones(3, 4, 4))
    avg.add(2, torch.ones(3, 4, 4))
    with pytest.raises(RuntimeError, match="window 1 of 4 never arrived"):
        avg.result()


@pytest.mark.parametrize("split", [True, False])
def test_guidance_gives_the_same_predictions_for_every_delivery_order(split):
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 8, 8)] * 3 + [(4, 5, 6)] * 2
    units = make_units(shapes, batch_size=2, split_guidance=split)
    raw = {(p, b): torch.randn(shapes[p], generator=g) for p in range(len(shapes)) for b in (0, 1)}
    outputs = [torch.stack([raw[row] for row in u.rows]) for u in units]
    expected = [guide(raw[(p, 0)], raw[(p, 1)], 7.5) for p in range(len(shapes))]
    n = len(units)
    one_by_one = [[k] for k in range(n)]
    backwards = [[k] for k in reversed(range(n))]
    all_at_once = [list(range(n))]
    in_pairs = [[k, k + 1] for k in range(0, n - 1, 2)] + ([[n - 1]] if n % 2 else [])
    scattered = [[n - 1, 0], list(range(1, n - 1))]
    for deliveries in (one_by_one, backwards, all_at_once, in_pairs, scattered):
        seen = []
        guidance = Guidance(units, len(shapes), 7.5, then=lambda ps, eps: seen.extend(ps) or list(eps * 2))
        for ks in deliveries:
            guidance.deliver(ks, [outputs[k] for k in ks])
        results = guidance.finish()
        assert sorted(seen) == list(range(len(shapes)))  # `then` once per patch
        # Batched or one by one, every element gets the same float ops: bit-identical.
        assert all(torch.equal(r, 2 * e) for r, e in zip(results, expected))


def test_guidance_refuses_lost_and_repeated_units():
    units = make_units([(4, 8, 8)] * 2, batch_size=1, split_guidance=True)
    guidance = Guidance(units, 2, 5.0)
    guidance.deliver([0], [torch.zeros(1, 4, 8, 8)])
    with pytest.raises(RuntimeError, match="delivered twice"):
        guidance.deliver([0], [torch.zeros(1, 4, 8, 8)])
    with pytest.raises(RuntimeError, match=r"work unit\(s\) \[1, 2, 3\] never delivered"):
        guidance.finish()


def test_shares_are_equal_the_larger_first_holding_the_last_ready_units():
    from collections import deque

    from apt_dist.ray_executor import WorkerState, _shares

    workers = [WorkerState(handle=None, index=i) for i in range(3)]
    calls = _shares(deque(range(10)), workers)  # the larger first; it sends its last unit alone, after the rest
    assert [(w.index, idx) for w, idx in calls] == [(0, [6, 7, 8]), (1, [0, 1, 2]), (2, [3, 4, 5]), (0, [9])]
    # Units 8 and 9 need deferred patches: the larger share takes the last ready ones instead.
    calls = _shares(deque(range(10)), workers, ready=lambda u: u < 8)
    assert [(w.index, idx) for w, idx in calls] == [(0, [4, 5, 6]), (1, [0, 1, 2]), (2, [3, 8, 9]), (0, [7])]
    # Equal shares all finish last: the bulks in queue order, each share's last unit alone (the first share's the very
    # last unit). Too few ready units to fill the larger shares: queue order (a tail from the end).
    assert [idx for _, idx in _shares(deque(range(9)), workers)] == [[0, 1], [2, 3], [4, 5], [8], [7], [6]]
    assert [idx for _, idx in _shares(deque(range(10)), workers, ready=lambda u: u < 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # Fewer units than workers: one each. A re-queued queue: positions in the queue count, not unit numbers (the larger
    # share, 4 then 0, sends 0 alone).
    assert [(w.index, idx) for w, idx in _shares(deque([5, 2]), workers)] == [(0, [5]), (1, [2])]
    assert [idx for _, idx in _shares(deque([9, 3, 4, 0]), workers)] == [[4], [9], [3], [0]]


def test_the_shares_that_finish_last_send_their_last_unit_alone_holding_the_last_ready_units():
    from collections import deque

    from apt_dist.ray_executor import LAST_TAIL_MIN_UNITS, WorkerState, _shares

    workers = [WorkerState(handle=None, index=i) for i in range(3)]
    m = LAST_TAIL_MIN_UNITS
    # Equal shares all finish last: each sends its last unit as a second call, after every first call. The tails
    # come last, so they hold the last units (the first share's the very last), the bulks the rest in queue order.
    calls = _shares(deque(range(3 * m)), workers)
    assert [w.index for w, _ in calls] == [0, 1, 2, 0, 1, 2]
    assert [idx for _, idx in calls] == [list(range(0, m - 1)), list(range(m - 1, 2 * m - 2)),
                                         list(range(2 * m - 2, 3 * m - 3)), [3 * m - 1], [3 * m - 2], [3 * m - 3]]
    # Only ready units (no deferred patch to make) go last: here the units from 2m on are deferred.
    calls = _shares(deque(range(3 * m)), workers, ready=lambda u: u < 2 * m)
    assert [idx for _, idx in calls[3:]] == [[2 * m - 1], [2 * m - 2], [2 * m - 3]]
    tails = {2 * m - 1, 2 * m - 2, 2 * m - 3}
    assert sum((idx for _, idx in calls[:3]), []) == [u for u in range(3 * m) if u not in tails]  # deferred ones last
    # Unequal: only the larger shares do; shares under the minimum never do.
    calls = _shares(deque(range(3 * m + 2)), workers)
    assert [(w.index, len(idx)) for w, idx in calls] == [(0, m), (1, m), (2, m), (0, 1), (1, 1)]
    assert [idx for _, idx in calls[3:]] == [[3 * m + 1], [3 * m]]
    assert [len(idx) for _, idx in _shares(deque(range(3 * (m - 1))), workers)] == [m - 1] * 3


def test_long_shares_stream_a_tail():
    from collections import deque

    from apt_dist.ray_executor import STREAM_SHARE_UNITS, WorkerState, _shares

    workers = [WorkerState(handle=None, index=i) for i in range(2)]
    n = 2 * STREAM_SHARE_UNITS + 1
    calls = _shares(deque(range(n)), workers)
    assert [w.index for w, _ in calls] == [0, 1, 0, 1]  # every bulk first, then the tails
    assert sorted(i for _, idx in calls for i in idx) == list(range(n))
    (_, bulk0), (_, bulk1), (_, tail0), (_, tail1) = calls
    t0, t1 = (STREAM_SHARE_UNITS + 1) // 8, STREAM_SHARE_UNITS // 8
    # The tails come last: they hold the last units, the larger share's (the last to finish) the very last.
    assert tail0 == list(range(n - t0, n)) and tail1 == list(range(n - t0 - t1, n - t0))
    # The larger share's bulk (which finishes after the other's) holds the units just before the tails.
    assert bulk0 == list(range(n - t0 - t1 - len(bulk0), n - t0 - t1)) and len(bulk0) == STREAM_SHARE_UNITS + 1 - t0
    assert bulk1 == list(range(STREAM_SHARE_UNITS - t1))


def test_shares_of_unequal_units_meet_the_longest_first_makespan():
    from collections import deque

    from apt_dist.ray_executor import WorkerState, _shares

    workers = [WorkerState(handle=None, index=i) for i in range(8)]
    # 4096x4096, last phase, 8 patches a call: 8 calls of 8 and one of 1; the 49 local windows (units 0-5) are made, the
    # dilated ones (units 6-8) deferred. Dealt by count, the share of two took the two last ready units: 16 patches.
    weights = [8.0] * 8 + [1.0]
    calls = _shares(deque(range(9)), workers, ready=lambda u: u < 6, weights=weights)
    assert max(sum(weights[u] for w, idx in calls if w is v for u in idx) for v in workers) == 9
    # The share of two (8 + 1) takes the last ready unit of 8 and sends the unit of 1, its lightest, alone and last.
    assert [(w.index, idx) for w, idx in calls] == [(0, [5]), (1, [0]), (2, [1]), (3, [2]), (4, [3]), (5, [4]), (6, [6]),
                                                    (7, [7]), (0, [8])]


def test_shares_by_weight_reach_the_plan_makespan_and_keep_the_rules_for_equal_units():
    import random
    from collections import deque

    from apt_dist.executor import makespan
    from apt_dist.ray_executor import WorkerState, _shares

    rng = random.Random(0)
    for _ in range(300):
        workers = [WorkerState(handle=None, index=i) for i in range(rng.randint(1, 9))]
        n = rng.randint(1, 40)
        weights = [float(rng.choice([8, 8, 8, 4, 1])) for _ in range(n)]  # runs of full calls and remainders
        cut = rng.randint(0, n)
        queue = rng.sample(range(n), n)  # a re-queued queue: any order
        calls = _shares(deque(queue), workers, ready=lambda u, cut=cut: u < cut, weights=weights)
        assert sorted(u for _, idx in calls for u in idx) == list(range(n))
        loads = [sum(weights[u] for w, idx in calls if w is v for u in idx) for v in workers]
        assert max(loads) == makespan(weights, len(workers))
        # Equal units: the same calls as without weights.
        same = [2.0] * n
        assert _shares(deque(queue), workers, ready=lambda u, cut=cut: u < cut, weights=same) == \
            _shares(deque(queue), workers, ready=lambda u, cut=cut: u < cut)


def test_deferred_patches_make_their_tail_once_and_only_when_needed():
    head = [torch.full((4, 8, 8), float(k)) for k in range(3)]
    made = []

    def tail():
        made.append(1)
        return [torch.full((4, 6, 6), 10.0), torch.full((4, 6, 6), 11.0)]

    dp = DeferredPatches(head, [(4, 6, 6)] * 2, tail)
    assert len(dp) == 5 and patch_shapes(dp) == [(4, 8, 8)] * 3 + [(4, 6, 6)] * 2
    units = make_units(patch_shapes(dp), 2, True)
    assert not made  # shapes and units need no tail
    assert [float(dp[k][0, 0, 0]) for k in range(3)] == [0.0, 1.0, 2.0] and not made
    assert float(dp[3][0, 0, 0]) == 10.0 and float(dp[-1][0, 0, 0]) == 11.0
    assert len(made) == 1  # made once
    assert [u.patches for u in units] == [[0, 1], [0, 1], [2], [2], [3, 4], [3, 4]]


def test_deferred_patches_refuse_a_tail_that_breaks_its_announced_shapes():
    dp = DeferredPatches([], [(4, 6, 6)], lambda: [torch.zeros(4, 5, 6)])
    with pytest.raises(ValueError, match="announced shapes"):
        dp[0]


class _RecordingViews:
    """A view set that records what it is handed: `take(indices, eps)`."""

    def __init__(self, shapes, value: float, log: list):
        self.shapes, self.crops, self.value, self.log = shapes, [(0, 0)] * len(shapes), value, log
        self.taken: dict[int, torch.Tensor] = {}
        _, h, w = shapes[0]
        self.cuts = [(slice(0, h), slice(k * w, (k + 1) * w)) for k in range(len(shapes))]  # side by side

    def source(self):
        self.log.append(("inputs", self.value))
        c, h, w = self.shapes[0]
        return torch.full((c, h, w * len(self.shapes)), self.value)

    def inputs(self):
        src = self.source()
        return [src[:, ys, xs] for ys, xs in self.cuts]

    def take(self, ks, eps):
        self.log.append(("take", self.value, list(ks)))
        self.taken.update(zip(ks, eps))


def test_denoise_hands_each_view_set_its_own_predictions_and_makes_later_sets_only_when_needed():
    from apt_dist.executor import InProcessExecutor, RenderContext

    class Echo(InProcessExecutor):  # every UNet row predicts its input: the guided prediction is the patch itself
        def _run_units(self, timestep, units, patches, crops, deliver):
            for k, unit in enumerate(units):
                deliver([k], [torch.stack([patches[p] for p, _ in unit.rows])])

    ex = Echo(denoiser=object())
    ex.context = RenderContext(model=None, embeds=None, original_size=(64, 64), guidance_scale=3.0, view_batch_size=4,
                               split_guidance=False)
    log = []
    # Both sets have patches of one shape, so one call and one batch of predictions spans both sets.
    first, second = _RecordingViews([(4, 6, 6)] * 3, 1.0, log), _RecordingViews([(4, 6, 6)] * 2, 2.0, log)
    ex.denoise(5, [first, second])
    assert log[0] == ("inputs", 1.0) and log[1] == ("inputs", 2.0)  # the second set's inputs, when a call needs them
    assert sorted(first.taken) == [0, 1, 2] and sorted(second.taken) == [0, 1]
    assert all(torch.equal(e, torch.full((4, 6, 6), 1.0)) for e in first.taken.values())
    assert all(torch.equal(e, torch.full((4, 6, 6), 2.0)) for e in second.taken.values())
    assert ex.stats.patch_evals == 5


def test_guide_is_classifier_free_guidance_in_float32():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for scale in (0.0, 0.3, 1.0, 7.5):
        got = guide(u.half(), c.half(), scale)
        assert got.dtype == torch.float32
        uu, cc = u.half().double(), c.half().double()
        torch.testing.assert_close(got.double(), uu + scale * (cc - uu), rtol=1e-6, atol=1e-6)


def _step_views():
    from apt_dist import schedules as S
    from apt_dist.fusion import DilatedViews, LocalViews
    from apt_dist.geometry import local_windows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 24, 20, generator=g)
    sched = S.make_schedule("euler", 10)
    windows = local_windows(24, 20, 16, 8, generator=g)
    return LocalViews(x, windows, 2, sched, 4, 8), DilatedViews(x, 2, 1.0, sched, 4)


def test_every_view_the_unet_sees_is_its_cut_of_the_view_sets_source():
    """What a remote executor sends once per step (source) and per call (cuts) gives exactly the inputs."""
    for vs in _step_views():
        src, inputs = vs.source(), vs.inputs()
        assert src.dim() == 3 and len(vs.cuts) == len(inputs) == len(vs.shapes)
        for (ys, xs), view, shape in zip(vs.cuts, inputs, vs.shapes):
            assert tuple(view.shape) == shape
            assert torch.equal(src[:, ys, xs], view)


def test_denoise_hands_the_executor_patches_that_are_cuts_of_the_step_sources():
    from apt_dist.executor import InProcessExecutor, RenderContext

    seen = {}

    class Check(InProcessExecutor):
        def _run_units(self, timestep, units, patches, crops, deliver):
            seen["cuts"] = [(j, ys, xs) for j, ys, xs in patches.cuts]
            seen["equal"] = [torch.equal(patches.source(j)[:, ys, xs], patches[i]) for i, (j, ys, xs) in enumerate(patches.cuts)]
            for k, unit in enumerate(units):
                deliver([k], [torch.stack([patches[p] for p, _ in unit.rows])])

    ex = Check(denoiser=object())
    ex.context = RenderContext(model=None, embeds=None, original_size=(64, 64), guidance_scale=3.0)
    local, dilated = _step_views()
    ex.denoise(5, [local, dilated])
    assert [j for j, _, _ in seen["cuts"]] == [0] * len(local.shapes) + [1] * len(dilated.shapes)
    assert len(seen["equal"]) == len(local.shapes) + len(dilated.shapes) and all(seen["equal"])

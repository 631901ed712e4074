import threading

import torch

from searchllm.streams import in_streams, resolve_streams


def test_in_streams_returns_results_in_item_order_without_autograd_on_shared_threads_and_restores_them():
    threads = torch.get_num_threads()
    seen = []

    def fn(x: int) -> int:
        seen.append((threading.get_ident(), torch.is_grad_enabled(), torch.get_num_threads()))
        return x * x

    assert in_streams(fn, range(7), 2) == [x * x for x in range(7)]
    assert torch.get_num_threads() == threads
    assert {grad for _, grad, _ in seen} == {False}
    assert {n for _, _, n in seen} == {max(1, threads // 2)}
    assert threading.get_ident() not in {t for t, _, _ in seen}  # the calls ran on the streams' threads


def test_one_stream_runs_in_the_callers_thread_and_auto_is_two_on_a_cpu_with_two_threads():
    assert in_streams(lambda x: (threading.get_ident(), torch.is_grad_enabled()), [0], 2) == [
        (threading.get_ident(), False)
    ]
    assert resolve_streams(3, "cpu") == 3
    assert resolve_streams(0, "cuda") == 1
    assert resolve_streams(0, "cpu") == (2 if torch.get_num_threads() >= 2 else 1)

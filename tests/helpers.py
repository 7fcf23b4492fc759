"""Small checks shared by the kernel test files."""
import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def assert_same_for_any_thread_count(run, counts=(1, 2, 3)) -> None:
    """run() returns a tuple of tensors; it must return them bitwise equal under each of `counts` threads (the
    process's thread count is put back afterwards)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))

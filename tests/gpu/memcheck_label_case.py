"""A small case of every CUDA label-row kernel path (_C.label_rows), run under compute-sanitizer
memcheck: every statistic with the top-k selection, the gradient with and without the entropy
coefficient, softcap and temperature, bf16 logits, int32 labels, ignored rows, both error paths
(read back to the host) and check_finite=False."""

import torch

from divkit import _C

n, v = 5, 333
x = torch.randn(n, v, device="cuda") * 3
labels = torch.tensor([1, -100, 2, 3, 332], device="cuda")


def vec():
    return torch.zeros(n, dtype=torch.float64, device="cuda")


s = torch.rand(n, dtype=torch.float64, device="cuda")
stats = {k: vec() for k in ("lse", "z_label", "mean_z", "entropy", "topk_mass", "log_sum_sq")}
for z, y in ((x.clone(), labels), (x.to(torch.bfloat16), labels.int())):
    for softcap, e in ((0.0, None), (5.0, -s)):
        _C.label_rows(
            z,
            y,
            **stats,
            is_top1=vec(),
            topk=7,
            temperature=1.3,
            softcap=softcap,
            coef_a0=s,
            coef_a1=0.1 * s,
            coef_b=-s,
            coef_c=0.01 * s,
            coef_e=e,
        )
x[2, 5] = float("nan")
try:
    _C.label_rows(x, labels, lse=vec())
    raise SystemExit("expected an error for a NaN logit")
except _C.Error as err:
    assert "token 2" in str(err), str(err)
try:
    _C.label_rows(x[:2], torch.tensor([0, v], device="cuda"), lse=vec()[:2])
    raise SystemExit("expected an error for a label out of range")
except _C.Error as err:
    assert "labels[1]" in str(err), str(err)
_C.label_rows(x, labels, lse=vec(), coef_a0=s, coef_b=s, coef_c=s, check_finite=False)
torch.cuda.synchronize()
print("memcheck label case done")

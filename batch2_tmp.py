import time, torch
from diffcodec.checkpoint import load_checkpoint
from diffcodec.runtime import network
torch.set_num_threads(2)
m = load_checkpoint(None)
fn = network(m.model, exact=True)
g = torch.Generator().manual_seed(0)
sizes = [8, 16, 24, 32, 40, 48, 64]
xs = {b: torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64) for b in sizes}
ts = {b: torch.full((b,), 500, dtype=torch.long) for b in sizes}
for b in sizes: fn(xs[b], ts[b])
res = {b: [] for b in sizes}
for r in range(5):
    for b in sizes:
        s = time.perf_counter(); fn(xs[b], ts[b]); res[b].append(b / (time.perf_counter() - s))
for b in sizes:
    v = sorted(res[b]); print(b, "fwd/s median %.1f  min %.1f max %.1f" % (v[2], v[0], v[-1]))

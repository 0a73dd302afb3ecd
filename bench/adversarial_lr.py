"""Usage: python bench/adversarial_lr.py [STEPS=100] [G_LR=0.0025]. Does the cheap W+ evaluation see what adversarial tuning learned? Tune the prior adversarially on alice t=0 (photos +
mirrors) for N steps, then reconstruct alice's t=0 test photos under several evaluation settings, in the prior and in the tuned model."""
import time, json, sys, torch
torch.set_num_threads(1)
from facecl_nb.profiles import get_profile
from facecl_nb.experiments import albums_3d
from facecl_nb.adversarial import AdversarialConfig, adversarial_tune, freeze_discriminator
from facecl_nb.anchors3d import mirror_photos, mirror_labels
from facecl_nb.evaluation import evaluate
from facecl_nb.core import FreeConfig
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
GLR = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0025
prof = get_profile('demo3d'); G = prof.load_prior('cpu'); D = freeze_discriminator(prof.load_discriminator('cpu'), 22)
enc = prof.load_encoder(G, 'cpu', prof.protocol)
a = albums_3d(persons=['alice'], log=lambda *x: None)[0]
x, c = a.images(0, 'train'), a.cameras(0, 'train')
X, C = torch.cat([x, mirror_photos(x)]), torch.cat([c, mirror_labels(c)])
t0 = time.perf_counter()
r = adversarial_tune(G, D, X, C, N, AdversarialConfig(batch_size=4, r1_gamma=1.0, freeze_d=22, g_lr=GLR), seed=0)
print('tuned', N, 'steps in', round(time.perf_counter() - t0), 's; stats', r['stats'], flush=True)
tests, cams = {0: a.images(0, 'test')}, {0: a.cameras(0, 'test')}
init = {0: enc.latents(G, tests[0], cams[0])}
settings = [('wplus enc lr.01 x10', dict(protocol='wplus', wplus_start='encoder', free=FreeConfig(steps=10, lr=0.01))),
            ('free(w) enc lr.05 x20', dict(protocol='free', free=FreeConfig(steps=20, lr=0.05)))]
out = {}
for name, model in (('prior', G), ('tuned', r['G'])):
    for sname, kw in settings:
        t1 = time.perf_counter()
        ev = evaluate(model, tests, init=init, cameras=cams, metrics=('psnr', 'lpips', 'dlib_dist'), **kw)
        out[f'{name} | {sname}'] = {m: round(v[0], 3) for m, v in ev.rows.items()} | {'s': round(time.perf_counter() - t1)}
        print(name, '|', sname, out[f'{name} | {sname}'], flush=True)
json.dump(out, open(f'bench/results/adversarial_lr_{N}_{GLR}.json', 'w'), indent=1)

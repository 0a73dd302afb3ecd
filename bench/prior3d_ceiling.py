"""Usage: python bench/prior3d_ceiling.py budget
       python bench/prior3d_ceiling.py finetune NAME [STEPS=400]     (NAME: one of VARIANTS below)

Where the camera-consistent demo prior (eg3d-demo-posed) stops, and whether more training moves it.

`budget` splits the prior's distance to the teacher along its rendering path, on 48 of its training latents and on the
16 unseen latents of `evaluate_prior3d`: the volume render through the super-resolution (what every run sees), the same
planes decoded at the head model's surface, the raw 32² render upsampled bilinearly, the teacher's own image pooled to
32² and upsampled (what a perfect 32² render would give), and the teacher plus Gaussian noise at the prior's PSNR (how
far dlib moves at that PSNR whatever the error looks like). It also gives a bootstrap interval of the 16-latent mean.

`finetune NAME` goes on from the shipped prior with one changed recipe, the polish phase's losses (volume-rendered view
at each sample's landmark camera, occupancy weight 0.5) with the variant's change, and evaluates it (`evaluate_prior3d`) every 200 steps.
Writes bench/results/prior3d_budget.json or bench/results/prior3d_finetune_NAME.json. One thread each.
"""
import json, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from facecl_nb import prior3d as P
from facecl_nb.core import resolve_weight, seed_everything
from facecl_nb.data import to_uint8
from facecl_nb.eg3d import load_eg3d, rays_from_label
from facecl_nb.faces import dlib_descriptors
from facecl_nb.generators import load_prior
from facecl_nb.metrics import lpips_loss, psnr

OUT = Path(__file__).parent/'results'
COPIED = ('backbone.convs.', 'backbone.scales.', 'backbone.shifts.')      # the teacher's own layers, frozen while distilling
VARIANTS = {   # trainable: parameter-name prefixes trained (None: all but the teacher's layers, as the recipe trains)
    'lpips_vgg_1': dict(w_lpips=1.0, lr=3e-4, trainable=None),
    'lpips_vgg_0.3': dict(w_lpips=0.3, lr=3e-4, trainable=None),
    'unfrozen': dict(w_lpips=0.0, lr=3e-4, trainable=('',)),          # the teacher's layers trained too
    'sr_only_lpips_0.3': dict(w_lpips=0.3, lr=1e-3, trainable=('superresolution.',)),
    'occupancy_x4': dict(w_lpips=0.0, lr=3e-4, trainable=None, w_occ=2.0),        # a sharper density: the occupancy loss 4× the recipe's
    'surface_and_volume': dict(w_lpips=0.0, lr=3e-4, trainable=None, surface=True),  # the surface decode's image losses kept beside the volume render's
}


def shipped():
    return load_eg3d(resolve_weight('eg3d-demo-posed')).eval()


def render_parts(G, z, x, c):
    "The prior's images of (z, c) along its path: SR of the volume render, SR of the surface decode, the raw render upsampled."
    R, opts = G.neural_rendering_resolution, G.rendering_kwargs
    up = lambda a: F.interpolate(a, scale_factor=x.shape[-1] // R, mode='bilinear', align_corners=False)
    with torch.no_grad():
        ws = G.mapping(z, c)
        vol = G.render(ws, c, noise_mode='none')                            # the renderer's own path, as every run sees it
        o, d = rays_from_label(c, R)                                        # the same planes read at the head model's surface
        t, _ = P.raycast_head(o, d, float(opts['ray_start']), float(opts['ray_end']))
        surf, _ = P.decode_at(G, G.planes(ws), o + t[..., None] * d)
        surf = surf.permute(0, 2, 1).reshape(len(z), -1, R, R)
        return {'volume render, super-resolved (what runs see)': vol['image'],
                'surface decode, super-resolved': G.superresolution(surf[:, :3], surf, ws, noise_mode='none'),
                'raw 32² volume render, bilinear up': up(vol['image_raw']),
                "teacher's own image at 32², bilinear up": up(F.avg_pool2d(x, x.shape[-1] // R))}


def budget():
    G, T = shipped(), load_prior()
    ds = P.distill_set(2000, seed=0)
    z, x, c = ds['z'][:48], ds['images'][:48], ds['c'][:48]
    parts = render_parts(G, z, x, c)
    p_vol = float(psnr(parts['volume render, super-resolved (what runs see)'].clamp(-1, 1), x).mean())
    noise = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 2 * 10 ** (-p_vol / 20)
    parts["teacher + Gaussian noise, σ set by the volume render's PSNR"] = noise
    d0 = dlib_descriptors(to_uint8(x))
    rows = []
    for name, y in parts.items():
        y = y.clamp(-1, 1)
        rows.append({'image': name, 'psnr': round(float(psnr(y, x).mean()), 2),
                     'dlib': round(float(np.linalg.norm(dlib_descriptors(to_uint8(y)) - d0, axis=-1).mean()), 3)})
    m = P.evaluate_prior3d(G, T)
    each = m['dlib_each']
    boot = np.random.default_rng(0).choice(each, (10000, len(each))).mean(1)
    out = {'training_latents': 48, 'parts': rows,
           'unseen': {'n': len(each), 'psnr': round(m['psnr'], 2), 'dlib_mean': round(float(each.mean()), 4),
                      'dlib_ci95': [round(float(q), 4) for q in np.percentile(boot, [2.5, 97.5])],
                      'dlib_each': [round(float(v), 3) for v in each]}}
    (OUT/'prior3d_budget.json').write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(json.dumps(out, indent=1, ensure_ascii=False))


def finetune(name, steps):
    v = VARIANTS[name]
    seed_everything(0)
    G, T = shipped().train().requires_grad_(True), load_prior()
    for n, p in G.named_parameters():
        p.requires_grad_(not n.startswith(COPIED) if v['trainable'] is None else n.startswith(v['trainable']))
    ds = P.distill_set(2000, seed=0)
    LP = lpips_loss('vgg').requires_grad_(False) if v['w_lpips'] else None
    opt = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=v['lr'], betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(77)
    evals, t_train = [], 0.0
    def ev(step):
        G.eval(); m = P.evaluate_prior3d(G, T); G.train()
        evals.append({'step': step, 'train_s': round(t_train), **{k: round(m[k], 4) for k in ('psnr', 'dlib_teacher', 'pairwise', 'yaw')}})
        print(json.dumps(evals[-1]), flush=True)
    ev(0)
    for step in range(steps):
        t0 = time.perf_counter()
        i = torch.randint(len(ds['z']), (8,), generator=gen)
        z, x, c = ds['z'][i], ds['images'][i], ds['c'][i]
        seen = {}
        hook = G.superresolution.register_forward_hook(lambda mod, inp, out: seen.__setitem__('img', out))
        L = P.prior3d_losses_posed(G, z, x, c, gen, volume=True); hook.remove()
        loss = L['image'] + L['raw'] + L['proj'] + v.get('w_occ', 0.5) * L['occupancy']
        if v.get('surface'):
            S = P.prior3d_losses_posed(G, z, x, c, gen, volume=False)
            loss = loss + S['image'] + S['raw']
        if LP is not None: loss = loss + v['w_lpips'] * LP(seen['img'], x).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        t_train += time.perf_counter() - t0
        if (step + 1) % 200 == 0 or step + 1 == steps: ev(step + 1)
    out = {'variant': name, **v, 'trainable': v['trainable'] or 'all but the teacher\'s layers', 'batch': 8, 'evals': evals}
    (OUT/f'prior3d_finetune_{name}.json').write_text(json.dumps(out, indent=1))


if __name__ == '__main__':
    if sys.argv[1] == 'budget': budget()
    else: finetune(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 400)

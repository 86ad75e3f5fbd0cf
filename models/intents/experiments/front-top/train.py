#!/usr/bin/env python3
"""kith's intent network in JAX, on frozen speech embeddings or with the
embedding model's top layers trained with it (see README.md).

The network is `models/src/intent/net.rs`'s: normalized embeddings, three
dilated convolutions (kernel 3, dilations 1, 2, 4, 96 channels, ReLU,
dropout 0.2), one attention-pooled softmax head per output, one span of up
to 6 frames masked in half the examples; AdamW at 2e-3 with cosine decay,
weight decay 0.05, batches of 32; the epoch kept is the best on a tenth of
the training clips held back. Reports "right first" per test condition:
every head with a target right, before any threshold.

    train.py MODELS_DIR DUMP_DIR FEATURES_DIR MODE EPOCHS SEED [TOP_LR [FRONT_EPOCHS]]

MODE: frozen (the embeddings as the trainer has them), top (conv2d_17-19
trained, rows of --cut 16), deep (conv2d_15-19 trained, rows of --cut 14),
deeper (conv2d_13-19 trained, rows of --cut 12), deepest (conv2d_11-19
trained, rows of --cut 10).

FRONT_EPOCHS (default: all) is kith's `--front-epochs`: of the EPOCHS, the
ones before the last FRONT_EPOCHS train the network alone on the frozen
embeddings; the last ones start from the best of those, train the layers
too, and have learning-rate schedules of their own. The epoch kept is the
best of all.

Writes right-first-MODE-seedSEED.npy in the working directory: per test
clip, whether the best answer was right, for comparing two runs clip by
clip.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import optax
from onnx import numpy_helper

from conditions import CONDITIONS, GOAL

MODELS, DUMP, FEAT, MODE = sys.argv[1:5]
EPOCHS, SEED = int(sys.argv[5]), int(sys.argv[6])
TOP_LR = float(sys.argv[7]) if len(sys.argv) > 7 else 3e-4
FRONT = min(int(sys.argv[8]), EPOCHS) if len(sys.argv) > 8 else EPOCHS
TRAIN, TEST = 'synthesizing_training_clips', 'synthesizing_test_clips'
ROWS = {'frozen': 16, 'top': 16, 'deep': 14, 'deeper': 12, 'deepest': 10}[MODE]


def load(name):
    idx = [line.rstrip('\n').split('\t') for line in open(f'{DUMP}/{name}.idx')]
    targets = np.array([[int(x) for x in r[4].split(',')] for r in idx], np.int32)
    condition = np.array([int(r[2]) for r in idx])
    rows = np.load(f'{FEAT}/{name}.rows{ROWS}.npy') if MODE != 'frozen' else None
    return rows, np.load(f'{FEAT}/{name}.emb.npy'), np.load(f'{FEAT}/{name}.count.npy'), targets, condition


rows_tr, emb_tr, cnt_tr, tg_tr, _ = load(TRAIN)
rows_te, emb_te, cnt_te, tg_te, cond_te = load(TEST)
heads = [int(max(tg_tr[:, h].max(), tg_te[:, h].max())) + 1 for h in range(tg_tr.shape[1])]
rng = np.random.default_rng(SEED)
perm = rng.permutation(len(tg_tr))
val, trn = perm[:len(perm) // 10], perm[len(perm) // 10:]
mean = emb_tr[trn].reshape(-1, 96).mean(0)
std = emb_tr[trn].reshape(-1, 96).std(0) + 1e-3
sil_e = jnp.asarray(np.load(f'{FEAT}/sil_e.npy'))[0]

weights = {i.name: numpy_helper.to_array(i)
           for i in onnx.load(f'{MODELS}/embedding_model.onnx').graph.initializer}


def pretrained(layer, kind):
    return jnp.asarray(next(v for k, v in weights.items()
                            if k.startswith(f'model/conv2d_{layer}/') and kind in k))


PRETRAINED = {f'{p}{n}': pretrained(n, 'weights' if p == 'w' else 'bias')
              for n in {'deeper': (13, 14), 'deepest': (11, 12, 13, 14)}.get(MODE, ())
              + (15, 16, 17, 18)
              for p in ('w', 'b')}
PRETRAINED['w19'] = pretrained(19, 'ReadVariableOp')
TRAINED = {'frozen': [], 'top': ['w17', 'b17', 'w18', 'b18', 'w19']}.get(MODE, list(PRETRAINED))


def act(x):  # the embedding model's LeakyRelu(0.2) then Max(-0.4)
    return jnp.maximum(jnp.where(x > 0, x, 0.2 * x), -0.4)


def conv2d(x, w, b=None, freq_pad=0):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (freq_pad, freq_pad)),
                                     dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
    return y if b is None else y + b[None, :, None, None]


def embed(tp, rows, cnt):
    """Rows [B, R, 96, bands] → the 64 embeddings, silence where no window was."""
    x = rows.astype(jnp.float32).transpose(0, 2, 1, 3)  # B, channels, time, freq
    if 'w11' in tp:  # four bands of 72 channels in
        x = act(conv2d(x, tp['w11'], tp['b11'], 1))
        x = act(conv2d(x, tp['w12'], tp['b12']))
    if 'w13' in tp:  # four bands, pooled to two over frequency
        x = act(conv2d(x, tp['w13'], tp['b13'], 1))
        x = act(conv2d(x, tp['w14'], tp['b14']))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 1, 2), (1, 1, 1, 2), 'VALID')
    if 'w15' in tp:
        x = act(conv2d(x, tp['w15'], tp['b15'], 1))
        x = act(conv2d(x, tp['w16'], tp['b16']))
    x = act(conv2d(x, tp['w17'], tp['b17'], 1))
    x = act(conv2d(x, tp['w18'], tp['b18']))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), 'VALID')
    e = conv2d(x, tp['w19'])[:, :, :, 0].transpose(0, 2, 1)
    pos = jnp.arange(64)[None, :]
    return jnp.where((pos < 64 - cnt[:, None])[..., None], sil_e, e)


def init(key):
    ks = jax.random.split(key, 4 + len(heads))
    p = {}
    for i in range(3):
        p[f'c{i}'] = jax.random.normal(ks[i], (96, 96, 3)) * np.sqrt(2 / (3 * 96))
        p[f'cb{i}'] = jnp.zeros(96)
    for h, k in enumerate(heads):
        p[f'q{h}'] = jnp.zeros(96)
        p[f'w{h}'] = jax.random.normal(ks[4 + h], (96, k)) / np.sqrt(96)
        p[f'b{h}'] = jnp.zeros(k)
    return p


def net(p, e, key=None, drop=0.2):
    x = (e - mean) / std
    b, t, _ = x.shape
    if key is not None:
        k1, k2, k3, key = jax.random.split(key, 4)
        length = jax.random.randint(k1, (b,), 1, 7)
        start = jax.random.randint(k2, (b,), 0, t - 6)
        on = jax.random.bernoulli(k3, 0.5, (b,))
        pos = jnp.arange(t)[None]
        span = (pos >= start[:, None]) & (pos < (start + length)[:, None]) & on[:, None]
        x = jnp.where(span[..., None], 0.0, x)
    x = x.transpose(0, 2, 1)
    for i, d in enumerate([1, 2, 4]):
        x = jax.lax.conv_general_dilated(x, p[f'c{i}'], (1,), [(d, d)], rhs_dilation=(d,),
                                         dimension_numbers=('NCH', 'OIH', 'NCH'))
        x = jax.nn.relu(x + p[f'cb{i}'][None, :, None])
        if key is not None:
            key, k = jax.random.split(key)
            x = x * jax.random.bernoulli(k, 1 - drop, x.shape) / (1 - drop)
    h = x.transpose(0, 2, 1)
    out = []
    for i in range(len(heads)):
        a = jax.nn.softmax(h @ p[f'q{i}'], axis=1)
        out.append(jnp.einsum('bt,btc->bc', a, h) @ p[f'w{i}'] + p[f'b{i}'])
    return out


def features(params, rows, emb, cnt):
    if MODE == 'frozen' or rows is None:
        return emb
    return embed({**PRETRAINED, **params['top']}, rows, cnt)


def loss_fn(params, rows, emb, cnt, tg, key):
    total = 0.0
    for h, logits in enumerate(net(params['net'], features(params, rows, emb, cnt), key)):
        t = tg[:, h]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(t, 0))
        total = total + jnp.sum(jnp.where(t >= 0, ce, 0.0)) / tg.shape[0]
    return total


params = {'net': init(jax.random.PRNGKey(SEED)), 'top': {k: PRETRAINED[k] for k in TRAINED}}


def optimizer(epochs):
    steps = epochs * (len(trn) // 32)
    return optax.multi_transform(
        {'net': optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=0.05),
         'top': optax.adam(optax.cosine_decay_schedule(TOP_LR, steps))},
        {'net': 'net', 'top': 'top'})


def make_step(opt):
    @jax.jit
    def step(params, state, rows, emb, cnt, tg, key):
        loss, g = jax.value_and_grad(loss_fn)(params, rows, emb, cnt, tg, key)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss
    return step


@jax.jit
def predict(params, rows, emb, cnt):
    return [jnp.argmax(o, 1) for o in net(params['net'], features(params, rows, emb, cnt))]


def right(params, rows, emb, cnt, tg):
    ok = []
    for s in range(0, len(tg), 256):
        r = rows[s:s + 256] if rows is not None else None
        best = predict(params, r, emb[s:s + 256], cnt[s:s + 256])
        t = tg[s:s + 256]
        good = np.ones(len(t), bool)
        for h, am in enumerate(best):
            good &= (t[:, h] < 0) | (np.asarray(am) == t[:, h])
        ok.append(good)
    return np.concatenate(ok)


key = jax.random.PRNGKey(SEED + 100)
best = (-1.0, params, 0)
started = time.time()
tuned = MODE != 'frozen'
# (first epoch, epochs, whether the rows and the layers are used)
phases = [(0, EPOCHS, tuned)] if FRONT == EPOCHS or not tuned else \
    [(0, EPOCHS - FRONT, False), (EPOCHS - FRONT, FRONT, True)]
for first, count, with_rows in phases:
    if first > 0:
        params = best[1]
    opt = optimizer(count)
    state = opt.init(params)
    step = make_step(opt)
    pick = (lambda r, i: r[i]) if with_rows else (lambda r, i: None)
    for epoch in range(first, first + count):
        order = rng.permutation(trn)
        losses = []
        for s in range(0, len(order) - 31, 32):
            b = np.sort(order[s:s + 32])
            key, k = jax.random.split(key)
            params, state, loss = step(params, state, pick(rows_tr, b), emb_tr[b], cnt_tr[b], tg_tr[b], k)
            losses.append(float(loss))
        v = right(params, pick(rows_tr, val), emb_tr[val], cnt_tr[val], tg_tr[val]).mean()
        if v >= best[0]:
            best = (float(v), params, epoch + 1)
        print(f'{MODE} epoch {epoch + 1}/{EPOCHS} {"layers " if with_rows else ""}loss {np.mean(losses):.4f} '
              f'validation {v:.4f} {time.time() - started:.0f} s', flush=True)
ok = right(best[1], rows_te if tuned else None, emb_te, cnt_te, tg_te)
result = {name: round(100 * float(ok[cond_te == c].mean()), 1) for c, name in enumerate(CONDITIONS)}
result['goal clips'] = round(100 * float(ok[np.isin(cond_te, GOAL)].mean()), 1)
result['epoch kept'], result['validation'] = best[2], round(100 * best[0], 1)
print(json.dumps({'mode': MODE, 'seed': SEED, 'top_lr': TOP_LR, 'front_epochs': FRONT,
                  'right first %': result}))
# Per test clip, whether the best answer was right (in the dump's order),
# for paired comparisons of two runs on the same clips.
np.save(f'right-first-{MODE}-seed{SEED}.npy', ok)

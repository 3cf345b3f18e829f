"""CoFiRec's item tokeniser: semantic IDs, one code per semantic level, coarse to fine (Wei et al., arXiv 2511.22707).

An item is split into ordered levels (ml-100k: genres, title, a fuller text, then the collaborative signal); every
level's embedding is quantised by a quantiser of its own (``levels``), so that the item's ID reads from broad to
specific. The ablation ``fused`` concatenates every level's embedding into one vector and quantises it with one
residual quantiser of the same depth and codebook sizes (the TIGER/LETTER design CoFiRec argues against).

Every quantiser is an RQ-VAE in LETTER's recipe: an MLP encoder to a small latent, residual vector quantisation
(one codebook for a level's own quantiser, one per level for the fused one), an MLP decoder; the loss is the
reconstruction error plus, per codebook, ``|| sg(r) - e ||^2 + beta || r - sg(e) ||^2`` (codebook and commitment,
beta 0.25), with the straight-through gradient; codebooks start from k-means of the first residuals. Training is
full-batch (a catalogue of a few thousand items) and keeps the step whose codes leave the fewest items sharing a code
tuple within that quantiser (the latest of equals). Items still sharing a whole ID afterwards are separated on the
last level: each keeps the nearest free code of the last codebook among the IDs with the same prefix (LETTER and
TIGER resolve collisions there too; an error when the last codebook is too small for a prefix).

Every random draw comes from a generator seeded by the run's seed, never the global stream: a run that builds its
codes gives the same codes in every process, and training after it draws what it would have drawn without it.
"""

import torch
import torch.nn.functional as F
from torch import nn

COMMITMENT = 0.25  # LETTER's and TIGER's beta


def kmeans(points, size, generator, iterations=20):
    """``size`` centres of ``points`` ``[n, d]`` by Lloyd's algorithm from distinct random points (with repeats when
    ``size > n``, nudged apart), seeded by ``generator``."""
    n = points.shape[0]
    if size <= n:
        start = torch.randperm(n, generator=generator)[:size]
    else:
        start = torch.randint(n, (size,), generator=generator)
    centres = points[start].clone()
    centres += 1e-3 * points.std() * torch.randn(centres.shape, generator=generator)
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(1)
        for index in range(size):
            members = points[assignment == index]
            if len(members):
                centres[index] = members.mean(0)
    return centres


class ResidualQuantizer(nn.Module):
    """An RQ-VAE: ``x [n, in] -> latent -> codes [n, len(codebook_sizes)] -> reconstruction``."""

    def __init__(self, in_size, latent_size, hidden_size, codebook_sizes):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, latent_size))
        self.decoder = nn.Sequential(nn.Linear(latent_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, in_size))
        self.codebooks = nn.ParameterList([nn.Parameter(torch.zeros(size, latent_size)) for size in codebook_sizes])

    @torch.no_grad()
    def init_codebooks(self, x, generator):
        residual = self.encoder(x)
        for codebook in self.codebooks:
            codebook.copy_(kmeans(residual, codebook.shape[0], generator))
            residual = residual - codebook[torch.cdist(residual, codebook).argmin(1)]

    def forward(self, x):
        """``(reconstruction, codes [n, depth], quantisation loss, last residual's distances [n, K_last])``."""
        latent = self.encoder(x)
        residual, quantized, loss, codes = latent, torch.zeros_like(latent), 0.0, []
        for codebook in self.codebooks:
            distances = torch.cdist(residual, codebook)
            code = distances.argmin(1)
            chosen = codebook[code]
            loss = loss + F.mse_loss(chosen, residual.detach()) + COMMITMENT * F.mse_loss(residual, chosen.detach())
            quantized = quantized + chosen
            residual = residual - chosen.detach()
            codes.append(code)
        straight_through = latent + (quantized - latent).detach()
        return self.decoder(straight_through), torch.stack(codes, 1), loss, distances


def shared_ids(codes):
    """How many items share their code tuple with an earlier item (0: every ID unique)."""
    return codes.shape[0] - torch.unique(codes, dim=0).shape[0]


def standardized(x):
    """Every column of ``x`` at mean 0 and standard deviation 1 (constant columns at 0)."""
    return (x - x.mean(0)) / x.std(0).clamp(min=1e-6)


def train_quantizer(
    x, codebook_sizes, generator, steps, standardize=True, latent_size=32, hidden_size=256, lr=1e-3, check_every=50
):
    """Train an RQ-VAE on ``x`` (its columns standardised first unless told not to) and return ``(codes [n, depth],
    last-level distances [n, K_last], report)``: the codes of the checked step with the fewest shared code tuples
    (the latest such step: a single codebook is fully used from its k-means start, and training then improves the
    codes, not their count)."""
    x = standardized(x) if standardize else x
    # The quantiser's own initial weights, from the generator (never the global random stream).
    quantizer = ResidualQuantizer(x.shape[1], latent_size, hidden_size, codebook_sizes)
    with torch.no_grad():
        for parameter in quantizer.parameters():
            if parameter.dim() > 1:
                bound = (1.0 / parameter.shape[1]) ** 0.5
                parameter.copy_((torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound)
            else:
                parameter.zero_()
    quantizer.init_codebooks(x, generator)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=lr)
    best = None
    for step in range(steps + 1):
        reconstruction, codes, vq_loss, distances = quantizer(x)
        if step % check_every == 0 or step == steps:
            shared = shared_ids(codes)
            if best is None or shared <= best[0]:  # the latest of equally distinct steps: the most trained
                best = (shared, step, codes.detach().clone(), distances.detach().clone())
        if step == steps:
            break
        loss = F.mse_loss(reconstruction, x) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shared, step, codes, distances = best
    report = {"kept_step": step, "shared_ids": int(shared), "final_loss": float(loss.detach())}
    return codes, distances, report


def separate_collisions(codes, last_distances, key):
    """Give every item a unique ID by changing the last code of those that share one: in each group of items with
    the same ID, the item nearest its code keeps it; the others, nearest first, take the nearest code of the last
    codebook that no item with the same prefix holds. ``codes`` ``[n, depth]`` (a copy is returned)."""
    codes = codes.clone()
    size = last_distances.shape[1]
    taken = {}
    for row in codes.tolist():
        taken.setdefault(tuple(row[:-1]), set()).add(row[-1])
    groups = {}
    for item, row in enumerate(codes.tolist()):
        groups.setdefault(tuple(row), []).append(item)
    for ids, items in sorted(groups.items()):
        if len(items) < 2:
            continue
        items.sort(key=lambda item: (float(last_distances[item, ids[-1]]), item))
        used = taken[ids[:-1]]
        for item in items[1:]:
            free = [code for code in last_distances[item].argsort().tolist() if code not in used]
            if not free:
                under = sum(1 for row in codes.tolist() if tuple(row[:-1]) == ids[:-1])
                raise ValueError(
                    f"'{key}': {under} items have the ID prefix {list(ids[:-1])}, more than the last codebook's {size} "
                    "codes can tell apart: enlarge the last codebook (or the earlier ones)."
                )
            codes[item, -1] = free[0]
            used.add(free[0])
    return codes


def build_codes(level_embeddings, codebook_sizes, fused, seed, steps, key="cofirec_codebook_sizes"):
    """Semantic IDs of every item: ``level_embeddings`` (one ``[n, d_l]`` matrix per level, coarse to fine, rows
    aligned with the items), ``codebook_sizes`` (one per level). Returns ``(codes [n, levels], report)``: codes
    unique per item, level ``l``'s in ``[0, codebook_sizes[l])``; the report gives each quantiser's kept step, the
    share of items whose ID another item also had before the fix (``collision_rate_before``) and after
    (``collision_rate_after``, 0), and every level's codebook usage (distinct codes used over its size)."""
    if len(level_embeddings) != len(codebook_sizes):
        raise ValueError(f"'{key}' has {len(codebook_sizes)} sizes for {len(level_embeddings)} levels.")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.enable_grad():
        if fused:
            # Every level standardised and weighted 1/sqrt(dim): each carries the same share of the fused vector.
            x = torch.cat([standardized(e.float()) / e.shape[1] ** 0.5 for e in level_embeddings], dim=1)
            codes, last, report = train_quantizer(x, codebook_sizes, generator, steps, standardize=False)
            quantizers = [report]
        else:
            columns, quantizers = [], []
            for embeddings, size in zip(level_embeddings, codebook_sizes, strict=True):
                level_codes, last, report = train_quantizer(embeddings.float(), [size], generator, steps)
                columns.append(level_codes[:, 0])
                quantizers.append(report)
            codes = torch.stack(columns, 1)
    n = codes.shape[0]
    before = collided_items(codes)
    fixed = separate_collisions(codes, last, key)
    return fixed, {
        "items": n,
        "quantizers": quantizers,
        "collision_rate_before": before / n,
        "collision_rate_after": collided_items(fixed) / n,
        "codebook_usage": [len(torch.unique(fixed[:, level])) / size for level, size in enumerate(codebook_sizes)],
    }


def collided_items(codes):
    """How many items share their whole ID with at least one other item."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


class CodeTrie:
    """The prefix tree of the items' IDs as global code tokens (level ``l``'s code ``c`` is token
    ``offsets[l] + c``). ``node_of[item, l]``: the node reached by the item's first ``l`` tokens (0: the root);
    ``child[node, token]``: the node after ``token`` (after the last level: the item), -1 where no item's ID goes."""

    def __init__(self, item_tokens, num_codes):
        # item_tokens [n_items, L] (row 0, the padding item, is never an ID: all -1); codes in [0, num_codes)
        n_items, depth = item_tokens.shape
        self.depth = depth
        children, node_of = [{}], torch.zeros(n_items, depth, dtype=torch.long)
        for item in range(1, n_items):
            node = 0
            for level, token in enumerate(item_tokens[item].tolist()):
                node_of[item, level] = node
                if level == depth - 1:
                    children[node][token] = item
                else:
                    if token not in children[node]:
                        children[node][token] = len(children)
                        children.append({})
                    node = children[node][token]
        self.node_of = node_of
        child = torch.full((len(children), num_codes), -1, dtype=torch.long)
        for node, table in enumerate(children):
            for token, target in table.items():
                child[node, token] = target
        self.child = child

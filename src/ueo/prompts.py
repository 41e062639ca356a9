"""Learnable prompts (CoOp style) encoded with the model's own text transformer.

Prompts are built in embedding space, `[SOS] ctx_1..ctx_m <tokens of "{name}."> [EOS]`, and
encoded by the frozen text tower. Because the tower's attention is causal and pooling reads
the end-of-text position, three shortcuts change nothing numerically:

* positions after a prompt's end-of-text token never influence it, so sequences are cut
  at their own end (classes are bucketed by length instead of padded to 77 tokens);
* the prefix `[SOS] ctx` is the same for every class, so its keys and values are computed
  once per layer and shared by all classes;
* in the last layer only the end-of-text position is read, so only that query is computed.

On a CPU all three pay. On a GPU the text pass is bound by launching kernels, not by their
work (a 10-token pass costs as much as a 77-token one), so the many small calls of the
bucketed path cost more than they save: there every prompt goes through the tower in one
call, cut after the longest end-of-text token (docs/performance.md). Both are exact.

`reference_features` keeps the plain full-length computation for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ueo.errors import UeoError
from ueo.names import spoken_name
from ueo.recipe import DEFAULT_CTX_INIT, DEFAULT_SEED


def prompt_text(name: str) -> str:
    """The class part of a prompt: the name in words (`_` stands for a space), then a full stop."""
    return spoken_name(name) + "."


class TextTower:
    """What prompt encoding needs from an open_clip text tower (CLIP or CustomTextCLIP)."""

    def __init__(self, model: nn.Module):
        tower = model.text if hasattr(model, "text") else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if (
            not all(hasattr(tower, a) for a in needed)
            or getattr(tower, "cls_emb", None) is not None
        ):
            raise UeoError(
                f"{type(model).__name__}'s text tower is not a causal CLIP text transformer; "
                "learnable prompts need one (Hugging Face text towers are not supported)."
            )
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if pool not in ("argmax", "eos"):
            raise UeoError(f"Text pooling '{pool}' is not supported (needs end-of-text pooling).")
        if getattr(tower, "attn_mask", None) is None:
            raise UeoError(
                "The text transformer has no causal mask; prompts need causal attention."
            )
        self.module = tower
        self.token_embedding = tower.token_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.context_length = tower.positional_embedding.shape[0]
        self.blocks = list(self.transformer.resblocks)
        self.standard_blocks = all(_is_standard_block(b) for b in self.blocks)

    # Tensors held directly by the tower are read from it at each use: `Module.to` may replace
    # them (buffers always, parameters on some devices), and the model is moved after it is built.
    @property
    def attn_mask(self) -> torch.Tensor:
        return self.module.attn_mask

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.module.positional_embedding

    @property
    def projection(self) -> torch.Tensor | nn.Module | None:
        return self.module.text_projection

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """ln_final is applied by the caller; this is the projection to the joint space."""
        if self.projection is None:
            return x
        if isinstance(self.projection, nn.Linear):
            return self.projection(x)
        return x @ self.projection


def _is_standard_block(block: nn.Module) -> bool:
    """Blocks we can run by hand: pre-norm, plain multi-head self-attention, MLP."""
    attn = getattr(block, "attn", None)
    return (
        all(hasattr(block, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and not hasattr(block, "ln_1_kv")
        and not hasattr(block, "ln_attn")
    )


class PromptLearner(nn.Module):
    """Shared learnable context + fixed class-name tokens -> normalised text features."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str | None = DEFAULT_CTX_INIT,
        bucketing: bool = True,
        seed: int = DEFAULT_SEED,
    ):
        super().__init__()
        self.tower = TextTower(model)
        self.class_names = list(class_names)
        self.bucketing = bucketing  # False: always the full-length path (the reference)
        sot, eot = _special_tokens(tokenizer)
        embed = self.tower.token_embedding
        device = embed.weight.device
        ctx = _initial_context(embed, tokenizer, n_ctx, ctx_init, seed)
        self.ctx = nn.Parameter(ctx.float())
        self.n_ctx = ctx.shape[0]
        self.ctx_init = ctx_init or ""
        suffix_ids = [tokenizer.encode(prompt_text(n)) + [eot] for n in self.class_names]
        self.prefix_len = 1 + self.n_ctx
        self.lengths = lengths = [self.prefix_len + len(s) for s in suffix_ids]
        self._check_lengths()
        with torch.no_grad():
            self.register_buffer(
                "sot_embedding", embed(torch.tensor([sot], device=device)).float(), persistent=False
            )
            suffixes = _padded(suffix_ids, self.tower.context_length - self.prefix_len, device)
            self.register_buffer("suffix_embedding", embed(suffixes).float(), persistent=False)
        self.register_buffer(
            "eot_index", torch.tensor(lengths, device=device) - 1, persistent=False
        )
        # Buckets of classes sharing one length: the bucketed path runs each without padding.
        self.buckets = [
            (length, torch.tensor([i for i, k in enumerate(lengths) if k == length], device=device))
            for length in sorted(set(lengths))
        ]

    def _check_lengths(self) -> None:
        """Every prompt must fit the text tower's context."""
        limit = self.tower.context_length
        long = [n for n, k in zip(self.class_names, self.lengths, strict=True) if k > limit]
        if long:
            raise UeoError(
                f"Class name(s) too long for the text context of {limit} tokens with "
                f"{self.n_ctx} context tokens: {', '.join(long[:5])}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self) -> torch.Tensor:
        """Normalised text features, classes x embed_dim, differentiable w.r.t. `ctx`."""
        if self.bucketed:
            return F.normalize(self._bucketed_features(), dim=-1)
        return F.normalize(self._truncated_features(), dim=-1)

    @property
    def bucketed(self) -> bool:
        """Whether `forward` runs the bucketed, shared-prefix path (on a CPU) rather than one
        call cut at the longest prompt (on an accelerator; see the module docstring)."""
        return self.bucketing and self.tower.standard_blocks and self.ctx.device.type == "cpu"

    def reference_features(self) -> torch.Tensor:
        """The plain computation: full-length prompts through the tower's own transformer."""
        return F.normalize(self._run_tower(self.tower.context_length), dim=-1)

    def _prompts(self, length: int) -> torch.Tensor:
        n = self.num_classes
        ctx = self.ctx.to(self.suffix_embedding.dtype)
        return torch.cat(
            [
                self.sot_embedding.expand(n, -1, -1),
                ctx.expand(n, -1, -1),
                self.suffix_embedding[:, : length - self.prefix_len],
            ],
            dim=1,
        )

    def _run_tower(self, length: int) -> torch.Tensor:
        t = self.tower
        x = self._prompts(length) + t.positional_embedding[:length]
        x = t.transformer(x, attn_mask=t.attn_mask[:length, :length])
        x = t.ln_final(x[torch.arange(self.num_classes, device=x.device), self.eot_index])
        return t.project(x)

    def _truncated_features(self) -> torch.Tensor:
        """Generic exact shortcut: cut every prompt after the longest end-of-text token."""
        return self._run_tower(max(self.lengths))

    def _bucketed_features(self) -> torch.Tensor:
        t = self.tower
        pos = t.positional_embedding
        prefix = torch.cat([self.sot_embedding, self.ctx.to(self.sot_embedding.dtype)])[None]
        prefix_kv = _prefix_keys_values(t.blocks, prefix, pos[: self.prefix_len])
        out = []
        for length, idx in self.buckets:
            x = (
                self.suffix_embedding[idx, : length - self.prefix_len]
                + pos[self.prefix_len : length]
            )
            out.append(_suffix_eot_features(t.blocks, x, prefix_kv))
        pooled = torch.cat(out, 0)
        order = torch.cat([idx for _, idx in self.buckets])
        pooled = pooled[torch.argsort(order)]
        return t.project(t.ln_final(pooled))


def _initial_context(
    embed: nn.Embedding, tokenizer, n_ctx: int | None, ctx_init: str | None, seed: int
) -> torch.Tensor:
    """The context's first value: the embedding of `ctx_init`'s tokens, or `n_ctx` random
    vectors drawn from `seed` alone (on the CPU, the same on every device), not from whatever
    the global generator holds when the model is built."""
    device = embed.weight.device
    if ctx_init:
        ctx_ids = tokenizer.encode(ctx_init)
        if n_ctx is not None and n_ctx != len(ctx_ids):
            raise UeoError(
                f"--ctx-init '{ctx_init}' is {len(ctx_ids)} tokens but --n-ctx is {n_ctx}: "
                "give matching values, or --ctx-init '' for a random context of n-ctx tokens."
            )
        with torch.no_grad():
            return embed(torch.tensor(ctx_ids, device=device)).clone()
    if not n_ctx:
        raise UeoError("A random context needs --n-ctx >= 1.")
    ctx = torch.empty(n_ctx, embed.weight.shape[1])
    nn.init.normal_(ctx, std=0.02, generator=torch.Generator().manual_seed(seed))
    return ctx.to(device)


def _padded(ids: list[list[int]], length: int, device: torch.device) -> torch.Tensor:
    """Token lists zero-padded to `length`: the class tokens at full context length, for the
    reference path."""
    full = torch.zeros(len(ids), length, dtype=torch.long, device=device)
    for i, row in enumerate(ids):
        full[i, : len(row)] = torch.tensor(row)
    return full


def _special_tokens(tokenizer) -> tuple[int, int]:
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    if sot is None or eot is None or not hasattr(tokenizer, "encode"):
        raise UeoError(
            f"Tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer; learnable prompts "
            "need start/end-of-text tokens."
        )
    return sot, eot


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, s, d = x.shape
    return x.view(b, s, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _qkv(block: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    return F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)


def _attend(block: nn.Module, q, k, v, causal: bool) -> torch.Tensor:
    n = block.attn.num_heads
    o = F.scaled_dot_product_attention(_heads(q, n), _heads(k, n), _heads(v, n), is_causal=causal)
    return block.attn.out_proj(_merge(o))


def _prefix_keys_values(blocks, prefix: torch.Tensor, pos: torch.Tensor):
    """Run the class-independent prefix once; keep each layer's keys and values."""
    x = prefix + pos
    kv = []
    for block in blocks:
        q, k, v = _qkv(block, block.ln_1(x))
        kv.append((k, v))
        x = x + block.ls_1(_attend(block, q, k, v, causal=True))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return kv


def _suffix_eot_features(blocks, x: torch.Tensor, prefix_kv) -> torch.Tensor:
    """Class tokens of one length attend to the shared prefix; returns the end-of-text rows."""
    n, s, _ = x.shape
    p = prefix_kv[0][0].shape[1]
    # Suffix query j sees every prefix key and suffix keys <= j.
    mask = torch.ones(s, p + s, dtype=torch.bool, device=x.device).tril(diagonal=p)
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        q, k, v = _qkv(block, block.ln_1(x))
        kp, vp = prefix_kv[i]
        k = torch.cat([kp.expand(n, -1, -1), k], 1)
        v = torch.cat([vp.expand(n, -1, -1), v], 1)
        heads = block.attn.num_heads
        if i == last:
            # Only the end-of-text (last) position is read out, and it sees every key.
            q, x = q[:, -1:], x[:, -1:]
            o = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
        else:
            o = F.scaled_dot_product_attention(
                _heads(q, heads), _heads(k, heads), _heads(v, heads), attn_mask=mask
            )
        x = x + block.ls_1(block.attn.out_proj(_merge(o)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x[:, -1]

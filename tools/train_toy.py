"""Train the toy model (hidiff.app.toy) on CPU or GPU; resumable, reproducible from its seeds.

    .venv/bin/python tools/train_toy.py --out runs/toy --steps 12000          # train / resume
    .venv/bin/python tools/train_toy.py --out runs/toy --export hidiff/app/toy/weights   # ship the EMA weights

Every step's pictures, timesteps and noise are a function of (--seed, step), so a run
stopped and resumed from its checkpoint sees the same data as an uninterrupted one.
The checkpoint (model, EMA, optimiser, step) is rewritten every --checkpoint-minutes and
at the end; training stops cleanly on SIGTERM/SIGINT after writing it.

Recipe (chosen to learn fast on a CPU): v-prediction on a cosine schedule with
min-SNR-5 loss weights, AdamW at 1e-3 with a linear warm-up, gradient clipping at 1,
an EMA of the weights (decay up to 0.999) which is what gets shipped, and a share of
empty prompts (--drop-share, default 10%) so classifier-free guidance works.

The shipped weights (hidiff/app/toy/weights) are three stages, one thread on a shared
2-core CPU (0.5 to 2.7 s per step, depending on the machine's load):

    # 1-2: the first toy model (about 90 minutes)
    train_toy.py --out runs/toy --steps 3799
    train_toy.py --out runs/toy --steps 4625 --lr 2e-4 --warmup 1
    train_toy.py --out runs/toy --export runs/toy-stage2
    # 3: guidance fine-tune, 20% empty prompts, new data stream (about 50 minutes)
    train_toy.py --out runs/toy-cfg --init-from runs/toy-stage2 --seed 1 --drop-share 0.2 \
        --lr 2e-4 --warmup 50 --steps 2400
    train_toy.py --out runs/toy-cfg --export hidiff/app/toy/weights

Why stage 3 exists: docs/cfgpp.md, "The toy model and guidance".
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hidiff.app.toy.pipeline import NATIVE, ToyPipeline, toy_components  # noqa: E402
from hidiff.app.toy.shapes import training_batch  # noqa: E402

#: Share of training samples whose prompt is replaced by "" (the unconditional input of
#: classifier-free guidance); ``--drop-share`` overrides it.
EMPTY_PROMPT_SHARE = 0.1
MIN_SNR = 5.0


def ema_decay(step: int, limit: float) -> float:
    # short memory early (the weights move fast), up to `limit` later
    return min(limit, (1 + step) / (10 + step))


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    parts = toy_components(seed=args.seed)
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).to(args.device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if args.init_from and not ckpt_path.exists():  # a new stage: start from exported weights
        init = load_toy_pipeline_folder(args.init_from)
        model["unet"].load_state_dict({k: v.float() for k, v in init.unet.state_dict().items()})
        model["text_encoder"].load_state_dict({k: v.float() for k, v in init.text_encoder.state_dict().items()})
        ema.load_state_dict(model.state_dict())
        print(f"initialised from {args.init_from}", flush=True)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=args.device)
        if state["args"]["seed"] != args.seed or state["args"]["batch"] != args.batch:
            raise SystemExit(
                f"{ckpt_path} was trained with seed/batch {state['args']['seed']}/{state['args']['batch']}; "
                "pass the same --seed and --batch to resume, or a new --out"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "args": vars(args),
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    stop = {"now": False}

    def on_signal(signum, frame):  # finish the step, write the checkpoint, exit
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    alphas = scheduler.alphas_cumprod.to(args.device)
    log = open(out / "log.txt", "a")
    last_save, start, losses = time.time(), time.time(), []
    while step < args.steps and not stop["now"]:
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x0, prompts = training_batch(args.seed * 1_000_003 + step, args.batch, NATIVE)
        drop = torch.rand(args.batch, generator=gen) < args.drop_share
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, t, noise = x0.to(args.device), t.to(args.device), noise.to(args.device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        snr = a / (1 - a)
        weight = snr.clamp(max=MIN_SNR) / (snr + 1)  # min-SNR-gamma for v-prediction
        pred = model["unet"](noisy, t, encoder_hidden_states=model["text_encoder"].encode(prompts)).sample
        loss = (weight * (pred - target) ** 2).mean()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = ema_decay(step, args.ema)
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - d)
        step += 1
        losses.append(loss.item())
        if step % args.log_every == 0:
            line = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": lr,
                "s_per_step": (time.time() - start) / len(losses),
            }
            print(json.dumps(line), flush=True)
            log.write(json.dumps(line) + "\n")
            log.flush()
            losses, start = [], time.time()
        if time.time() - last_save > 60 * args.checkpoint_minutes:
            save()
            last_save = time.time()
    save()
    print(f"checkpoint at step {step} in {ckpt_path}", flush=True)


def load_pipeline(out: str, use_ema: bool = True) -> ToyPipeline:
    """A ToyPipeline with the weights of a training checkpoint (EMA by default)."""
    state = torch.load(Path(out) / "checkpoint.pt", map_location="cpu")
    parts = toy_components()
    model = torch.nn.ModuleDict({"unet": parts["unet"], "text_encoder": parts["text_encoder"]})
    model.load_state_dict(state["ema" if use_ema else "model"])
    pipe = ToyPipeline(
        unet=parts["unet"].eval(), text_encoder=parts["text_encoder"].eval(), scheduler=parts["scheduler"]
    )
    pipe.set_progress_bar_config(disable=True)
    print(f"{out}: step {state['step']}", flush=True)
    return pipe


def load_toy_pipeline_folder(folder: str) -> ToyPipeline:
    pipe = ToyPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.out)
    pipe.unet.to(torch.float16)  # halves the shipped file; loading casts back to float32
    pipe.text_encoder.to(torch.float16)
    pipe.save_pretrained(args.export, safe_serialization=True)
    print(f"saved {args.export}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy", help="run folder: checkpoint.pt and log.txt")
    parser.add_argument("--steps", type=int, default=12000, help="train until this step")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=250)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and the data stream")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--drop-share",
        type=float,
        default=EMPTY_PROMPT_SHARE,
        help=f"share of samples trained on the empty prompt, for guidance (default {EMPTY_PROMPT_SHARE})",
    )
    parser.add_argument(
        "--init-from",
        help="start a new run (no checkpoint in --out yet) from an exported ToyPipeline folder",
    )
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--export", help="write the EMA weights of --out's checkpoint as a ToyPipeline folder and exit")
    args = parser.parse_args()
    if args.export:
        export(args)
    else:
        train(args)


if __name__ == "__main__":
    main()

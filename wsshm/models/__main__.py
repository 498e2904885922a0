"""``python -m wsshm.models [NAME ...]``: parameter counts and encoder widths as a Markdown table."""
import argparse

import torch

from .registry import build_model, canonical_arch, list_models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wsshm.models", description=__doc__.split(":", 1)[1])
    parser.add_argument("names", nargs="*", help="registry names (default: list_models())")
    names = parser.parse_args(argv).names or list_models()
    for name in names:
        try:
            canonical_arch(name)
        except ValueError as error:
            parser.error(str(error))
    print("| name | parameters | encoder | decoder + ASPP + heads | encoder widths (stem, layer1..4) |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        with torch.device("meta"):  # shapes only: counting unet_r18_w1000 allocates nothing
            model = build_model(name)
        total = sum(p.numel() for p in model.parameters())
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            print(f"| `{model.arch}` | {total / 1e6:.2f} M | - | - | - |")
            continue
        in_encoder = sum(p.numel() for p in encoder.parameters())
        print(f"| `{model.arch}` | {total / 1e6:.2f} M | {in_encoder / 1e6:.2f} M | "
              f"{(total - in_encoder) / 1e6:.2f} M | {', '.join(map(str, encoder.channels))} |")


if __name__ == "__main__":
    main()

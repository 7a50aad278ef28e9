"""Convert a Swin detection checkpoint between the original release layout (mmdet 2.x fork) and the
mmdet 3.x ``SwinTransformer`` layout.

    python tools/convert_checkpoint.py IN.pth OUT.pth            # original -> mmdet 3.x
    python tools/convert_checkpoint.py IN.pth OUT.pth --reverse  # mmdet 3.x -> original

tools/test.py converts on load, so this is only needed to store converted files. The output holds
``{"state_dict": ..., "meta": {"converted_from": ...}}``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: Optional[Sequence[str]] = None) -> Path:
    import torch

    from det_repq_vit.checkpoint import (convert_legacy_swin_keys, extract_state_dict,
                                         is_legacy_swin_layout, read_checkpoint, to_legacy_swin_keys)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--reverse", action="store_true", help="mmdet 3.x layout -> original layout")
    args = p.parse_args(argv)
    sd = extract_state_dict(read_checkpoint(args.src))
    legacy = is_legacy_swin_layout(sd)
    if args.reverse:
        if legacy:
            raise SystemExit(f"{args.src} is already in the original layout")
        out = to_legacy_swin_keys(sd)
    else:
        if not legacy:
            raise SystemExit(f"{args.src} is not in the original Swin detection layout "
                             "(no backbone.layers.* keys); nothing to convert")
        out = convert_legacy_swin_keys(sd)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": out, "meta": {"converted_from": str(args.src),
                                            "layout": "original" if args.reverse else "mmdet3"}}, dst)
    print(f"wrote {len(out)} tensors to {dst}")
    return dst


if __name__ == "__main__":
    main()

"""Whether a checkpoint's diffusion model is worth sampling: the round-trip figure stored in its
card and the warning HEAL gives when it is far below the source model's own Dice.

The round trip renders source-style images from *ground-truth* labels of held-out source cases,
segments the edge-selected rendering with the source model and scores that segmentation against
the labels (``round_trip.py``). When even the ground truth does not survive the round trip, the
candidates cannot carry the structure either, and HEAL's edge-guided stages replace a good
segmentation with a worse one.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

#: Provenance key of the stored round trip.
ROUND_TRIP_KEY = "diffusion_round_trip"

#: HEAL warns when the round-trip Dice is below this share of the source model's Dice on the same
#: slices of the real images.
FAR_BELOW_RATIO = 0.6


def round_trip_warning(provenance: Mapping[str, Any]) -> Optional[str]:
    """The warning for a checkpoint card's provenance, or None when there is nothing to say.

    Args:
        provenance: the checkpoint's provenance; its ``diffusion_round_trip`` entry (when
            present) holds ``round_trip_dice`` and ``source_dice`` (mean foreground Dice on the
            same held-out slices).

    Returns:
        One sentence when the round trip is missing (the model was trained before it was
        measured) or below :data:`FAR_BELOW_RATIO` of the source Dice; else None.
    """
    figure = provenance.get(ROUND_TRIP_KEY)
    if not figure:
        return ("This checkpoint's diffusion model has no round-trip figure (trained before it was "
                "measured, with --round-trip-slices 0, or on a single case), so nobody has checked that "
                "its renderings carry the structure; compare --stages hd with the full result before "
                "trusting the edge-guided stages.")
    round_trip, source = float(figure["round_trip_dice"]), float(figure["source_dice"])
    if source > 0 and round_trip < FAR_BELOW_RATIO * source:
        return (f"The diffusion model's round trip is far below the source model: the source model "
                f"finds {round_trip:.2f} mean Dice on images rendered from ground-truth labels of "
                f"held-out source cases, against {source:.2f} on the real images. Its candidates "
                "cannot carry the structure, so the edge-guided stages (hd+egs, heal) will most "
                "likely make the result worse than --stages hd. Train the diffusion model longer "
                "(on a GPU), or use --stages hd.")
    return None

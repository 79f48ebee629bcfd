"""What a dataset run did: counts, skipped images and speed, as data and as lines for a person."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EvalReport:
    """What happened during a run (all processes together)."""

    num_images: int = 0  # images with at least one person, i.e. run through the model
    num_people: int = 0
    num_results: int = 0  # masks written
    people_without_prompt: int = 0  # people with no usable keypoint: no mask
    skipped_images: list = dataclasses.field(default_factory=list)  # [{"file_name", "reason"}]
    seconds: float = 0.0
    num_devices: int = 1
    num_processes: int = 1

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "EvalReport":
        """Inverse of `to_dict` (derived fields ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_second": self.images_per_second}


def format_report(report: EvalReport) -> str:
    """Human-readable lines about a run (counts, skipped images, speed)."""
    lines = [f"{report.num_images} images, {report.num_people} people, {report.num_results} "
             f"masks in {report.seconds:.1f} s ({report.images_per_second:.2f} images/s on "
             f"{report.num_devices} device(s))"]
    if report.people_without_prompt:
        lines.append(f"{report.people_without_prompt} people had no usable keypoint (none "
                     "labelled or inside the image): no mask")
    if report.skipped_images:
        lines.append(f"skipped {len(report.skipped_images)} image(s):")
        lines += [f"  {s['file_name']}: {s['reason']}" for s in report.skipped_images]
    return "\n".join(lines)

"""Secret randomness and the patient as the unit of DP accounting.

Every draw that protects privacy (DP-SGD noise, the Poisson sample, central DP noise) comes from a generator
whose state is drawn from the operating system's secure source where the noise is added
(:func:`secure_generator`); it is never derived from the run seed, the round or the site name, which other
parties know. :class:`PatientSampled` turns a scan dataset into a patient dataset so that sampling and
clipping are per pseudonymous patient. Re-exported by ``lungmae_core.privacy``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import torch

from lungmae_core.errors import ConfigError

__all__ = ["PRIVACY_UNIT", "secure_seed", "secure_generator", "patient_ids_of", "count_patients", "PatientSampled"]

#: What one record of DP accounting is: a pseudonymous patient (every scan of a patient is one unit).
PRIVACY_UNIT = "patient"


def secure_seed() -> int:
    """64 bits from the operating system's secure source (``secrets``, i.e. ``os.urandom``).

    The seed of every generator that draws DP noise or a Poisson sample. It is never derived from anything
    another party knows (run seed, round, site name): a coordinator that could rebuild the noise could
    subtract it and read the clipped gradient sum.
    """
    return secrets.randbits(64)


#: Layout of torch's CPU generator state (``CPUGeneratorImplState``): the Mersenne Twister's 624 words sit
#: as uint64 (low 32 bits used) after ``the_initial_seed`` (u64), ``left`` (i32), ``seeded`` (i32), ``next`` (u64).
_MT_STATE_OFFSET, _MT_WORDS, _CPU_STATE_BYTES = 24, 624, 5056


def _fill_mt_state(generator: torch.Generator) -> torch.Generator:
    """Replace a CPU generator's 624-word Mersenne Twister state with words from the OS's secure source.

    ``manual_seed`` on a CPU generator keeps only the low 32 bits of the seed (torch seeds its MT19937 with a
    uint32), so a seeded CPU generator has at most 2^32 possible noise streams, few enough to search. Writing
    the state itself gives 19,968 secret bits. The layout is checked on the generator first; if torch ever
    changes it this raises instead of drawing predictable noise.
    """
    import numpy as np

    seed = secure_seed()
    generator.manual_seed(seed)
    state = generator.get_state().numpy().copy()
    first_word = int.from_bytes(state[_MT_STATE_OFFSET:_MT_STATE_OFFSET + 8].tobytes(), "little")
    if state.size != _CPU_STATE_BYTES or first_word != seed & 0xFFFFFFFF:
        raise RuntimeError("Unable to seed the DP generator from the OS as torch's CPU generator state has an "
                           f"unexpected layout ({state.size} bytes); refusing to draw DP noise from a 32-bit seed")
    words = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    state[_MT_STATE_OFFSET:_MT_STATE_OFFSET + 8 * _MT_WORDS] = np.frombuffer(words.tobytes(), dtype=np.uint8)
    generator.set_state(torch.from_numpy(state))
    return generator


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` whose whole state comes from the OS's secure source.

    CPU: the Mersenne Twister's 624 state words are written from ``secrets`` (:func:`_fill_mt_state`; a
    plain ``manual_seed`` would keep only 32 bits). CUDA: Philox takes the full 64-bit :func:`secure_seed`.

    Why not Opacus' ``secure_mode``: it needs ``torchcsprng``, which is not maintained for current torch
    releases and not installable here. These generators are not cryptographic (an attacker who saw very many
    raw outputs could in principle recover the state), but no raw output is ever released: the noise is
    added to clipped gradients and only the noised sum leaves the party, and the state is never derivable
    from anything another party knows. Each round, each party draws a fresh generator.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        return _fill_mt_state(generator)
    return generator.manual_seed(secure_seed())


def patient_ids_of(dataset: Any) -> list[str] | None:
    """The pseudonymous patient id of every item of a scan dataset (also through ``Subset``); None if unknown."""
    ids = getattr(dataset, "patient_ids", None)
    if ids is not None:
        return [str(i) for i in ids]
    if isinstance(dataset, torch.utils.data.Subset):
        inner = patient_ids_of(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    return None


def count_patients(patient_ids: Iterable[str]) -> int:
    """Distinct pseudonymous patients in a sequence of per-scan patient ids."""
    return len(set(patient_ids))


class PatientSampled(torch.utils.data.Dataset[Any]):
    """The patients of a scan dataset: item ``i`` is one scan of patient ``i``, drawn afresh on every access.

    DP-SGD's guarantee is about one record; a patient with three studies would otherwise be three records
    and lose three times the stated privacy. Here a record is a pseudonymous patient: Poisson sampling picks
    patients, and a picked patient contributes exactly one of its scans, so one patient changes a step's
    clipped-gradient sum by at most ``C`` whatever the number of its scans. (The alternative, all of a
    patient's scans in one group with one clipped group gradient, needs variable-size groups that Opacus'
    per-sample machinery does not batch.) Over the epochs every scan of a patient is used.

    Which scan is picked does not need to be secret: the sensitivity argument holds for any choice that
    does not depend on other patients. It is drawn independently per access from the OS source
    (``secrets``), so it is also independent of the presence of other patients.

    Args:
        dataset: a scan dataset with ``patient_ids`` (one per item), as ``lungmae_core.data`` datasets have.

    Raises:
        ConfigError: when the dataset has no ``patient_ids`` or their count differs from its length.
    """

    def __init__(self, dataset: Any) -> None:
        ids = patient_ids_of(dataset)
        if ids is None or len(ids) != len(dataset):
            raise ConfigError(
                f"Unable to sample by patient as the dataset {type(dataset).__name__} has no patient_ids list of "
                f"its length ({len(dataset)}); DP accounting is per patient, so every scan needs its patient's "
                "pseudonym")
        groups: dict[str, list[int]] = {}
        for index, pid in enumerate(ids):
            groups.setdefault(str(pid), []).append(index)
        self.dataset = dataset
        self.patient_ids = list(groups)
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Any:
        group = self.groups[index]
        return self.dataset[group[0] if len(group) == 1 else group[secrets.randbelow(len(group))]]

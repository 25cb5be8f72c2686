"""vidalign: post-train VideoLLMs for fine-grained motion with a video diffusion teacher."""

__version__ = "0.1.0"

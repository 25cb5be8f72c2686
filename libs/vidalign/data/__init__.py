"""Video data for training, demos and tests."""

from vidalign.data.toy import DIRECTIONS, ToyClip, moving_squares, read_video, write_mp4

__all__ = ["DIRECTIONS", "ToyClip", "moving_squares", "read_video", "write_mp4"]

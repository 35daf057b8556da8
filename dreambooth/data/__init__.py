"""Training data: images, captions and [filewords], aspect buckets, epoch planning, class images."""

"""Small services every room may use: error types, files, images, download, allocator."""

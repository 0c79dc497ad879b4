"""Dataset kinds: ImageNet folder/list, Fashion-MNIST IDX, in-memory and synthetic arrays."""

from hpcsgd.data.datasets.arrays import ArrayDataset, SyntheticDataset
from hpcsgd.data.datasets.base import Dataset
from hpcsgd.data.datasets.fashion_mnist import FashionMNIST
from hpcsgd.data.datasets.imagenet import FileListDataset, image_folder, image_list

__all__ = ["ArrayDataset", "Dataset", "FashionMNIST", "FileListDataset", "SyntheticDataset",
           "image_folder", "image_list"]

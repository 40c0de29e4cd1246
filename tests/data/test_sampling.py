"""Training order and augmentation that resumed and multi-process runs reproduce exactly."""

import torch

from grounding.data.coco import CocoDetection, detection_transforms
from grounding.data.sampling import EpochSampler, ResumableDataLoader


def augmented(root, seed=0):
    transforms = detection_transforms(True, image_size=64, max_size=100, train_scales=[48, 64], flip_prob=0.5, crop_prob=0.5)
    return CocoDetection(root / "annotations" / "instances_train.json", root / "images" / "train", transforms, train=True, seed=seed)


def test_order_depends_on_seed_and_epoch_only_and_ranks_interleave(synthetic_root):
    dataset = augmented(synthetic_root)
    one = EpochSampler(dataset, seed=5, num_replicas=1, rank=0)
    one.set_epoch(2)
    order = [i for i, _ in one]
    assert sorted(order) == list(range(len(dataset))) and all(e == 2 for _, e in one)
    torch.manual_seed(123)  # the global random state plays no part
    again = EpochSampler(dataset, seed=5, num_replicas=1, rank=0)
    again.set_epoch(2)
    assert [i for i, _ in again] == order
    again.set_epoch(3)
    assert [i for i, _ in again] != order
    # two processes: rank r takes order[r::2], so one process with batch 2b sees what two with batch b see
    shares = []
    for rank in (0, 1):
        sampler = EpochSampler(dataset, seed=5, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        shares.append([i for i, _ in sampler])
    assert shares[0] == order[0::2] and shares[1] == order[1::2]


def test_a_sample_is_augmented_by_its_seed_epoch_and_index_alone(synthetic_root):
    dataset = augmented(synthetic_root)
    torch.manual_seed(1)
    first_image, first_target = dataset[(3, 7)]
    torch.manual_seed(99)
    second_image, second_target = dataset[(3, 7)]
    assert torch.equal(first_image, second_image) and torch.equal(first_target["boxes"], second_target["boxes"])
    # loading a sample leaves the global random state where it was
    torch.manual_seed(1)
    reference = torch.rand(3)
    torch.manual_seed(1)
    dataset[(3, 7)]
    assert torch.equal(torch.rand(3), reference)
    # another epoch or another seed: other augmentations of the same image (some of 8 epochs differ in size)
    sizes = {tuple(dataset[(3, epoch)][0].shape) for epoch in range(8)}
    assert len(sizes) > 1
    other = augmented(synthetic_root, seed=1)
    assert any(not torch.equal(other[(3, e)][0], dataset[(3, e)][0]) for e in range(4))


def test_resumed_loader_gives_the_rest_of_the_epoch(synthetic_root):
    dataset = augmented(synthetic_root)

    def loader():
        return ResumableDataLoader(dataset, EpochSampler(dataset, seed=0, num_replicas=1, rank=0), batch_size=4,
                                   collate_fn=lambda batch: [target["image_id"] for _, target in batch])

    full = loader()
    full.sampler.set_epoch(1)
    uninterrupted = list(full)
    assert len(uninterrupted) == len(full) == 3  # 12 images, batch 4

    first = loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 1}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert len(resumed) == 3  # the epoch's length is unchanged: Lightning counts its progress against it
    rest = list(resumed)
    assert seen + rest == uninterrupted
    assert resumed.state_dict() == {"epoch": 1, "batches": 3}
    resumed.sampler.set_epoch(2)  # the next epoch is whole again
    assert len(list(resumed)) == 3

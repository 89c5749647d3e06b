"""The one home of the papers behind nnssl's trainers: printed in training logs and written into checkpoints.

Checkpoints store ``citations`` in the form nnU-Net master's fine-tuning reads and prints (its
``PretrainedTrainer.print_citations`` via the plans' ``pretrain_info``): a list of
``{"type", "name", "apa_citations", "bibtex_citations"}`` dicts, one per thing used. Older nnssl checkpoints stored
plain APA strings; ``apa_lines`` reads both.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Union


@dataclass(frozen=True)
class Citation:
    """One thing a result depends on (``type``: framework, architecture, pretraining framework or method) and its
    paper."""

    type: str
    name: str
    apa: str
    bibtex: str

    def as_checkpoint_entry(self) -> Dict[str, object]:
        return {"type": self.type, "name": self.name, "apa_citations": [self.apa], "bibtex_citations": [self.bibtex]}


CheckpointCitation = Union[str, Mapping[str, object]]

NNUNET = Citation(
    "framework", "nnU-Net",
    "Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring method for deep "
    "learning-based biomedical image segmentation. Nature Methods 18, 203-211 (2021).",
    "@article{isensee2021nnu, title={nnU-Net: a self-configuring method for deep learning-based biomedical image "
    "segmentation}, author={Isensee, Fabian and Jaeger, Paul F and Kohl, Simon AA and Petersen, Jens and "
    "Maier-Hein, Klaus H}, journal={Nature Methods}, volume={18}, number={2}, pages={203--211}, year={2021}}")
RESENC = Citation(
    "architecture", "ResEnc U-Net",
    "Isensee F, Wald T, Ulrich C, et al. nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image "
    "Segmentation. MICCAI 2024.",
    "@inproceedings{isensee2024nnu, title={nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image "
    "Segmentation}, author={Isensee, Fabian and Wald, Tassilo and Ulrich, Constantin and others}, "
    "booktitle={MICCAI}, year={2024}}")
PRIMUS = Citation(
    "architecture", "Primus",
    "Wald T, Roy S, Isensee F, Ulrich C, Ziegler S, Trofimova D, et al. Primus: Enforcing Attention Usage for 3D "
    "Medical Image Segmentation. arXiv:2503.01835 (2025).",
    "@article{wald2025primus, title={Primus: Enforcing Attention Usage for 3D Medical Image Segmentation}, "
    "author={Wald, Tassilo and Roy, Saikat and Isensee, Fabian and Ulrich, Constantin and Ziegler, Sebastian and "
    "Trofimova, Dasha and others}, journal={arXiv preprint arXiv:2503.01835}, year={2025}}")
OPENMIND = Citation(
    "pretraining framework", "nnssl (OpenMind)",
    "Wald T, Ulrich C, et al. An OpenMind for 3D medical vision self-supervised learning. arXiv:2412.17041 (2024).",
    "@article{wald2024openmind, title={An OpenMind for 3D medical vision self-supervised learning}, "
    "author={Wald, Tassilo and Ulrich, Constantin and others}, journal={arXiv preprint arXiv:2412.17041}, "
    "year={2024}}")
S3D = Citation(
    "pretraining method", "S3D (sparse MAE)",
    "Wald T, Ulrich C, Suprijadi J, et al. Revisiting MAE pre-training for 3D medical image segmentation. CVPR 2025.",
    "@inproceedings{wald2025revisiting, title={Revisiting MAE pre-training for 3D medical image segmentation}, "
    "author={Wald, Tassilo and Ulrich, Constantin and Suprijadi, Jonathan and others}, booktitle={CVPR}, "
    "year={2025}}")
SPARK = Citation(
    "pretraining method", "SparK",
    "Tian K, Jiang Y, Diao Q, et al. Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked "
    "Modeling. ICLR 2023.",
    "@inproceedings{tian2023designing, title={Designing BERT for Convolutional Networks: Sparse and Hierarchical "
    "Masked Modeling}, author={Tian, Keyu and Jiang, Yi and Diao, Qishuai and others}, booktitle={ICLR}, "
    "year={2023}}")
MAE = Citation(
    "pretraining method", "MAE",
    "He K, Chen X, Xie S, et al. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022.",
    "@inproceedings{he2022masked, title={Masked Autoencoders Are Scalable Vision Learners}, author={He, Kaiming and "
    "Chen, Xinlei and Xie, Saining and others}, booktitle={CVPR}, year={2022}}")
AMAES = Citation(
    "pretraining method", "AMAES",
    "Munk A, Ambsdorf J, Llambias S, Nielsen M. AMAES: Augmented Masked Autoencoder Pretraining on Public Brain MRI "
    "Data for 3D-Native Segmentation. MICCAI 2024 Workshop on Advancing Data Solutions in Medical Imaging AI "
    "(ADSMI).",
    "@inproceedings{munk2024amaes, title={AMAES: Augmented Masked Autoencoder Pretraining on Public Brain MRI Data "
    "for 3D-Native Segmentation}, author={Munk, Asbj{\\o}rn and Ambsdorf, Jakob and Llambias, Sebastian and "
    "Nielsen, Mads}, booktitle={MICCAI Workshop on Advancing Data Solutions in Medical Imaging AI (ADSMI)}, "
    "year={2024}}")
VOCO = Citation(
    "pretraining method", "VoCo",
    "Wu L, Zhuang J, Chen H. VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical Image "
    "Analysis. CVPR 2024.",
    "@inproceedings{wu2024voco, title={VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D "
    "Medical Image Analysis}, author={Wu, Linshan and Zhuang, Jiaxin and Chen, Hao}, booktitle={CVPR}, "
    "year={2024}}")
SIMCLR = Citation(
    "pretraining method", "SimCLR",
    "Chen T, Kornblith S, Norouzi M, Hinton G. A Simple Framework for Contrastive Learning of Visual "
    "Representations. ICML 2020 (PMLR 119, 1597-1607).",
    "@inproceedings{chen2020simple, title={A Simple Framework for Contrastive Learning of Visual Representations}, "
    "author={Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey}, booktitle={ICML}, "
    "pages={1597--1607}, year={2020}}")
MODELS_GENESIS = Citation(
    "pretraining method", "Models Genesis",
    "Zhou Z, Sodha V, Pang J, Gotway MB, Liang J. Models Genesis. Medical Image Analysis 67, 101840 (2021).",
    "@article{zhou2021models, title={Models Genesis}, author={Zhou, Zongwei and Sodha, Vatsal and Pang, Jiaxuan and "
    "Gotway, Michael B and Liang, Jianming}, journal={Medical Image Analysis}, volume={67}, pages={101840}, "
    "year={2021}}")
VOLUME_FUSION = Citation(
    "pretraining method", "VolumeFusion",
    "Wang G, Wu J, Luo X, Liu X, Li K, Zhang S. MIS-FM: 3D Medical Image Segmentation using Foundation Models "
    "Pretrained on a Large-Scale Unannotated Dataset. arXiv:2306.16925 (2023).",
    "@article{wang2023misfm, title={MIS-FM: 3D Medical Image Segmentation using Foundation Models Pretrained on a "
    "Large-Scale Unannotated Dataset}, author={Wang, Guotai and Wu, Jianghao and Luo, Xiangde and Liu, Xinglong and "
    "Li, Kang and Zhang, Shaoting}, journal={arXiv preprint arXiv:2306.16925}, year={2023}}")
SWINUNETR = Citation(
    "pretraining method", "SwinUNETR pretraining",
    "Tang Y, Yang D, Li W, Roth HR, Landman B, Xu D, Nath V, Hatamizadeh A. Self-Supervised Pre-Training of Swin "
    "Transformers for 3D Medical Image Analysis. CVPR 2022.",
    "@inproceedings{tang2022self, title={Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image "
    "Analysis}, author={Tang, Yucheng and Yang, Dong and Li, Wenqi and Roth, Holger R and Landman, Bennett and Xu, "
    "Daguang and Nath, Vishwesh and Hatamizadeh, Ali}, booktitle={CVPR}, pages={20730--20740}, year={2022}}")

PRETRAINING_BASE = (NNUNET, RESENC, OPENMIND)


def checkpoint_entries(citations: Iterable[Citation]) -> List[Dict[str, object]]:
    """``citations`` as a checkpoint stores them (nnU-Net master's dict form), each once, in order."""
    return [citation.as_checkpoint_entry() for citation in dict.fromkeys(citations)]


def apa_lines(entries: Sequence[CheckpointCitation]) -> List[str]:
    """The APA references of a checkpoint's ``citations``, each once: dicts (ours, master's) and old plain strings."""
    lines: List[str] = []
    for entry in entries:
        if isinstance(entry, str):
            lines.append(entry)
        else:
            lines.extend(str(line) for line in entry.get("apa_citations") or entry.get("bibtex_citations") or [])
    return list(dict.fromkeys(lines))

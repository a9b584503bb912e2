"""A padded-text classifier (pack_padded_sequence) trained with torch.nn.LSTM and with fused_lstm.LSTM, side by side.

The "texts" are token sequences of random lengths (4 to 24) drawn with a seeded RNG from a small vocabulary; the
label says whether token 1 occurs more often than token 2, something an LSTM has to count to get right. A batch
is padded, embedded and packed with pack_padded_sequence(enforce_sorted=False), run through a bidirectional
2-layer LSTM (batch_first, dropout between the layers), and classified from the last layer's h_n of both
directions. At the end both models are scored on held-out texts (eval mode).

The fused model is built with fused_lstm.LSTM and given the nn.LSTM model's state_dict, so both runs start from
the same weights; they see the same batches and draw the same dropout masks, so their losses should agree to
float32 rounding. Over a long run the two columns drift apart slowly, as any two float32 trainings whose
arithmetic differs in the last bit do (nn.LSTM runs oneDNN or ATen's kernels on the CPU, fused_lstm its own); a
1-ulp nudge to nn.LSTM's initial weights moves its own losses by a similar amount.

Run:  .venv/bin/python examples/padded_classifier.py --steps 150
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import fused_lstm
import side_by_side

VOCAB = 12  # token 0 is padding
TOKEN_PROBS = torch.tensor([0.0, 0.2, 0.2] + [0.6 / (VOCAB - 3)] * (VOCAB - 3))


class Classifier(nn.Module):
    def __init__(self, lstm_cls, embed=16, hidden=32, layers=2, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed, padding_idx=0)
        self.lstm = lstm_cls(embed, hidden, num_layers=layers, dropout=dropout, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, tokens, lengths):  # tokens: [B, T] padded, lengths: [B] -> logits [B, 2]
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=-1))  # last layer, forward and backward


def make_texts(count, gen):
    """`count` random texts: (padded tokens [count, T], lengths [count], labels [count])."""
    lengths = torch.randint(4, 25, (count,), generator=gen)
    texts = [torch.multinomial(TOKEN_PROBS, int(n), replacement=True, generator=gen) for n in lengths]
    labels = torch.tensor([int((t == 1).sum() > (t == 2).sum()) for t in texts])
    return pad_sequence(texts, batch_first=True), lengths, labels


def train(model, data, batch_order, args):
    tokens, lengths, labels = data
    model = model.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed + 1)  # same dropout masks for both runs
    losses = []
    for idx in batch_order:
        logits = model(tokens[idx].to(args.device), lengths[idx])  # lengths stay on the CPU, as packing wants
        loss = nn.functional.cross_entropy(logits, labels[idx].to(args.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, data, device):
    tokens, lengths, labels = data
    model.eval()
    return (model(tokens.to(device), lengths).argmax(-1).cpu() == labels).float().mean().item()


def main(argv=None):
    parser = side_by_side.parser(__doc__.split("\n")[0], steps=150, lr=5e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    train_data, test_data = make_texts(2048, gen), make_texts(512, gen)
    batch_order = [torch.randint(0, 2048, (args.batch_size,), generator=gen) for _ in range(args.steps)]
    print(f"2048 training texts ({train_data[2].float().mean():.0%} positive), 512 held out, {args.steps} steps")

    torch.manual_seed(args.seed)
    model = Classifier(nn.LSTM)
    fused_model = Classifier(fused_lstm.LSTM)
    fused_model.load_state_dict(model.state_dict())  # the very same checkpoint loads into the fused model
    ref = train(model, train_data, batch_order, args)
    fused = train(fused_model, train_data, batch_order, args)
    side_by_side.print_table(ref, fused, args.log_every or max(1, args.steps // 10))
    acc_ref, acc_fused = accuracy(model, test_data, args.device), accuracy(fused_model, test_data, args.device)
    print(f"held-out accuracy: nn.LSTM {acc_ref:.1%}, fused_lstm {acc_fused:.1%}")
    return ref, fused


if __name__ == "__main__":
    main()

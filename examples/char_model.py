"""A character-level language model trained with torch.nn.LSTM and with fused_lstm.LSTM, side by side.

The model is embedding -> 2-layer LSTM (dropout between the layers) -> linear, trained to predict the next
character of a few public-domain paragraphs (the opening of Lewis Carroll's "Alice's Adventures in Wonderland",
1865) that are written into this file. The two runs start from the same weights (the model is built twice from one
seed, once with each LSTM class: fused_lstm.LSTM is a drop-in), see the same batches in the same order and draw
the same dropout masks, so their losses should agree to float32 rounding. Over a long run the two columns drift
apart slowly, as any two float32 trainings whose arithmetic differs in the last bit do (nn.LSTM runs oneDNN or
ATen's kernels on the CPU, fused_lstm its own); a 1-ulp nudge to nn.LSTM's initial weights moves its own losses by
a similar amount.

Run:  .venv/bin/python examples/char_model.py --steps 200
"""

import torch
from torch import nn

import fused_lstm
import side_by_side

TEXT = """\
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do:
once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations
in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?'
So she was considering in her own mind (as well as she could, for the hot day made her feel very sleepy
and stupid), whether the pleasure of making a daisy-chain would be worth the trouble of getting up and
picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her.
There was nothing so very remarkable in that; nor did Alice think it so very much out of the way to hear
the Rabbit say to itself, 'Oh dear! Oh dear! I shall be late!' (when she thought it over afterwards, it
occurred to her that she ought to have wondered at this, but at the time it all seemed quite natural); but
when the Rabbit actually took a watch out of its waistcoat-pocket, and looked at it, and then hurried on,
Alice started to her feet, for it flashed across her mind that she had never before seen a rabbit with
either a waistcoat-pocket, or a watch to take out of it, and burning with curiosity, she ran across the
field after it, and fortunately was just in time to see it pop down a large rabbit-hole under the hedge.
"""


class CharModel(nn.Module):
    def __init__(self, vocab_size, lstm_cls, embed=32, hidden=96, layers=2, dropout=0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = lstm_cls(embed, hidden, num_layers=layers, dropout=dropout)  # time-major: [T, B, E]
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens):  # tokens: [T, B] -> logits [T, B, V]
        output, _ = self.lstm(self.embed(tokens))
        return self.head(output)


def make_batches(data, steps, seq_len, batch_size, seed):
    """`steps` batches of random windows: (inputs [T, B], next-character targets [T, B])."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()], dim=1)
        batches.append((windows[:-1], windows[1:]))
    return batches


def train(lstm_cls, vocab_size, batches, args):
    torch.manual_seed(args.seed)  # same initial weights for both LSTM classes
    model = CharModel(vocab_size, lstm_cls).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(args.seed + 1)  # same dropout masks for both runs
    losses = []
    for inputs, targets in batches:
        inputs, targets = inputs.to(args.device), targets.to(args.device)
        logits = model(inputs)
        loss = loss_fn(logits.reshape(-1, vocab_size), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    parser = side_by_side.parser(__doc__.split("\n")[0], steps=200, lr=3e-3)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(ch) for ch in TEXT])
    batches = make_batches(data, args.steps, args.seq_len, args.batch_size, args.seed)
    print(f"{len(TEXT)} characters, vocabulary {len(chars)}, {args.steps} steps of {args.batch_size}x{args.seq_len}")

    ref = train(nn.LSTM, len(chars), batches, args)
    fused = train(fused_lstm.LSTM, len(chars), batches, args)
    side_by_side.print_table(ref, fused, args.log_every or max(1, args.steps // 10))
    return ref, fused


if __name__ == "__main__":
    main()

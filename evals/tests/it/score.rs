//! The scorer against the model's own one-text-at-a-time answers.

use std::ops::ControlFlow;

use candle_core::quantized::GgmlDType;

use pai_evals::item::Detail;
use pai_evals::{Check, Item, Scorer, Task};
use pai_model::{generate, perplexity, AdapterStack, GenerateOptions};

use crate::tiny;

fn continuation(id: &str, context: &str, text: &str) -> Item {
    Item {
        id: id.into(),
        group: "g".into(),
        domain: "tasks".into(),
        task: Task::Continuation {
            context: context.into(),
            text: text.into(),
        },
    }
}

#[test]
fn packed_scores_equal_each_text_scored_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), GgmlDType::F32);
    let texts = [
        "the heron waits by the pond at dawn",
        "fn add(a: i32, b: i32) -> i32 { a + b }",
        "short",
        "Four score and seven years ago our fathers brought forth on this continent a new nation",
        "x y z",
    ];
    let items: Vec<Item> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| continuation(&format!("t{i}"), "", t))
        .collect();
    let scorer = |row_tokens, pack| Scorer {
        model: &base.model,
        tokenizer: &base.tokenizer,
        adapters: AdapterStack::NONE,
        row_tokens,
        pack,
    };
    // All in one row, each alone in a row, and each through the serving forward: the same scores,
    // and the same as perplexity's.
    let packed = scorer(256, true).score(&items).unwrap();
    let served = scorer(256, false).score(&items).unwrap();
    for (p, s) in packed.iter().zip(&served) {
        assert!((p.score - s.score).abs() < 1e-4, "{p:?} {s:?}");
    }
    let alone: Vec<_> = items
        .iter()
        .map(|i| {
            scorer(256, true)
                .score(std::slice::from_ref(i))
                .unwrap()
                .remove(0)
        })
        .collect();
    for ((p, a), text) in packed.iter().zip(&alone).zip(texts) {
        assert!((p.score - a.score).abs() < 1e-4, "{p:?} {a:?}");
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (base.tokenizer.adds_bos(), base.tokenizer.bos()) {
            ids.push(bos);
        }
        ids.extend(base.tokenizer.encode(text, false).unwrap());
        let Detail::Continuation { tokens, nll, .. } = p.detail else {
            panic!("{p:?}")
        };
        if ids.len() < 2 {
            continue;
        }
        let want = perplexity(&base.model, &AdapterStack::NONE, &ids, 256, |_, _| {}).unwrap();
        assert_eq!(tokens, want.tokens_scored, "{text}");
        assert!(
            (nll - want.mean_nll).abs() < 1e-4,
            "{text}: {nll} vs {}",
            want.mean_nll
        );
        assert!((p.score + nll).abs() < 1e-12);
    }
    // A context is conditioned on, not scored.
    let with_context = scorer(256, false)
        .score(&[continuation("c", "the heron waits", " by the pond at dawn")])
        .unwrap();
    let Detail::Continuation { tokens, .. } = with_context[0].detail else {
        panic!()
    };
    assert_eq!(
        tokens,
        base.tokenizer
            .encode(" by the pond at dawn", false)
            .unwrap()
            .len()
    );
}

#[test]
fn choices_pick_the_likeliest_and_generations_are_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), GgmlDType::Q8_0);
    let scorer = Scorer {
        model: &base.model,
        tokenizer: &base.tokenizer,
        adapters: AdapterStack::NONE,
        row_tokens: 128,
        pack: false,
    };
    let choices = vec![
        " red".to_string(),
        " green apples".to_string(),
        " blue".to_string(),
    ];
    let items: Vec<Item> = (0..3)
        .map(|answer| Item {
            id: format!("c{answer}"),
            group: "colours".into(),
            domain: "tasks".into(),
            task: Task::Choice {
                context: "The colour of the sky is".into(),
                choices: choices.clone(),
                answer,
            },
        })
        .collect();
    let results = scorer.score(&items).unwrap();
    let Detail::Choice { chosen, logliks } = &results[0].detail else {
        panic!()
    };
    let best = logliks
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert_eq!(*chosen, best);
    // Exactly the item whose answer is the likeliest choice scores 1.
    let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
    assert_eq!(scores.iter().sum::<f64>(), 1.0);
    assert_eq!(scores[best], 1.0);

    let prompt = "Once upon a time";
    let mut ids = Vec::new();
    if let (true, Some(bos)) = (base.tokenizer.adds_bos(), base.tokenizer.bos()) {
        ids.push(bos);
    }
    ids.extend(base.tokenizer.encode(prompt, false).unwrap());
    let opts = GenerateOptions {
        max_tokens: Some(8),
        ..GenerateOptions::default()
    };
    let want = generate(
        &base.model,
        &base.tokenizer,
        &AdapterStack::NONE,
        &ids,
        &opts,
        |_| ControlFlow::Continue(()),
    )
    .unwrap()
    .text;
    let items = [
        Item {
            id: "exact".into(),
            group: "g".into(),
            domain: "tasks".into(),
            task: Task::Generate {
                prompt: prompt.into(),
                check: Check::ExactMatch(want.clone()),
                max_tokens: 8,
            },
        },
        Item {
            id: "never".into(),
            group: "g".into(),
            domain: "tasks".into(),
            task: Task::Generate {
                prompt: prompt.into(),
                check: Check::Contains("\u{1F600}never".into()),
                max_tokens: 8,
            },
        },
    ];
    let results = scorer.score(&items).unwrap();
    assert_eq!(results[0].detail, Detail::Generate { text: want.clone() });
    // As a continuation, the greedy text is the likeliest at every token; another is not.
    let greedy = |text: &str| {
        let item = Item {
            id: "g".into(),
            group: "g".into(),
            domain: "tasks".into(),
            task: Task::Continuation {
                context: prompt.into(),
                text: text.into(),
            },
        };
        match &scorer.score(std::slice::from_ref(&item)).unwrap()[0].detail {
            Detail::Continuation { greedy, .. } => *greedy,
            other => panic!("{other:?}"),
        }
    };
    assert!(!greedy(" zzzz qqqq"));
    // The model's own likeliest next token (one that decodes and re-encodes to itself) is greedy.
    let mut ids = Vec::new();
    if let (true, Some(bos)) = (base.tokenizer.adds_bos(), base.tokenizer.bos()) {
        ids.push(bos);
    }
    ids.extend(base.tokenizer.encode(prompt, false).unwrap());
    let input = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = base.model.new_cache(ids.len());
    let last = base
        .model
        .forward_last(&input, &mut cache, &AdapterStack::NONE)
        .unwrap()
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()[0];
    let piece = base.tokenizer.decode(&[last], false).unwrap();
    assert_eq!(
        base.tokenizer.encode(&piece, false).unwrap(),
        [last],
        "{piece:?}"
    );
    assert!(greedy(&piece), "{piece:?}");
    assert_eq!((results[0].score, results[1].score), (1.0, 0.0));
}

// A small built-in training corpus for the demo tokenizers: original everyday English
// prose, some dialogue, numbers and punctuation, a few code snippets and short
// sentences in other scripts. Written for this project; ~31 KB.

const prose: string[] = [
  `Morning in a small town starts early. The baker turns on the ovens before the sun comes up, and by six o'clock the smell of fresh bread drifts down the street. People stop on their way to work, buy a loaf or a pastry, and talk about the weather. Most days it is the same short conversation: it might rain later, it was colder yesterday, the buses are late again. Nobody minds. The routine is part of what makes the place feel like home.`,

  `Cooking at home does not have to be complicated. A good meal can be made from a handful of ingredients: an onion, a few cloves of garlic, some tomatoes, olive oil, salt and pepper. Start by warming the oil in a heavy pan over medium heat. Add the chopped onion and let it soften slowly, stirring every minute or so, until it turns golden and sweet. Then add the garlic, and after thirty seconds the tomatoes. Let everything simmer for twenty minutes while you boil water for the pasta. Taste the sauce, adjust the salt, and finish with a little fresh basil if you have some.`,

  `When you bake bread, patience matters more than skill. Mix flour, water, yeast and salt, knead the dough for about ten minutes until it feels smooth and elastic, then cover the bowl and leave it somewhere warm. After an hour or two it should have doubled in size. Shape it gently, let it rise again, and bake it in a hot oven. The crust should sound hollow when you tap the bottom of the loaf. If it does not, give it a few more minutes.`,

  `The weather changed quickly that afternoon. Dark clouds gathered over the hills, the wind picked up, and the first heavy drops of rain hit the windows just after three. Within minutes the streets were running with water. People ran for shelter under shop awnings, holding newspapers and bags over their heads. Then, almost as suddenly as it had started, the storm passed. The sun came out, the pavements steamed, and a bright rainbow stretched across the sky above the river.`,

  `Spring is the busiest season in the garden. The soil needs to be turned and fed with compost, seeds have to be sown in trays on the windowsill, and the weeds seem to grow faster than anything else. By late April the first lettuces are ready to plant outside, followed by beans, peas and courgettes. Tomatoes should wait until the nights are warm. Water in the morning rather than in the evening, so that the leaves dry during the day and the plants stay healthy.`,

  `Summer brings long evenings and lazy weekends. Families pack picnics and drive to the coast, children build sandcastles and chase the waves, and the beaches fill with umbrellas of every colour. In the cities, people sit outside cafes until late at night, drinking cold lemonade and watching the world go by. Remember to drink plenty of water, wear a hat, and use sunscreen, because the midday sun can be stronger than you think.`,

  `Autumn is the season of harvest and change. The leaves on the trees turn yellow, orange and deep red before they fall, and the air smells of wood smoke and wet earth. Apples and pears are picked, pumpkins are carved, and the evenings grow shorter every week. It is a good time to clean the gutters, check the heating, and find the warm coats and scarves that were put away in the spring.`,

  `Winter can be hard, but it has its pleasures too. There is nothing quite like coming in from a freezing walk to a warm kitchen, a pot of soup on the stove and a cup of hot tea. Snow makes the world quiet; footsteps are muffled and even the traffic seems to slow down. Children build snowmen and throw snowballs, while their parents shovel the driveway and worry about icy roads.`,

  `Travelling by train is one of the most relaxing ways to see a country. You can read a book, look out of the window at fields and villages, or talk to the people sitting opposite you. Buy your ticket in advance to save money, arrive at the station a little early, and check the platform number on the departure board. If the train is delayed, ask the staff for information; they usually know more than the announcements say.`,

  `Before a long trip, make a simple checklist. Passport, tickets, wallet, phone and charger, a change of clothes, any medicine you need, and a copy of your travel insurance. Tell a friend where you are going. Learn a few words of the local language, such as hello, please, thank you and excuse me. People appreciate the effort, even if your pronunciation is terrible.`,

  `Our neighbour has a dog called Biscuit, a friendly brown spaniel who loves everyone. Every morning he waits by the gate for the postman, wagging his tail so hard that his whole body shakes. He is not a good guard dog. If a burglar ever came, Biscuit would probably bring him a ball and ask to play. Cats in the street are a different story: he chases them with great enthusiasm and never catches any.`,

  `Keeping a pet is a big responsibility. Dogs need daily walks, regular meals, training and visits to the vet. Cats are more independent, but they still need attention, a clean litter box and a safe place to sleep. Fish seem easy, yet their tanks must be cleaned and the water tested. Before you bring an animal home, think about how much time and money you can really give it over the years.`,

  `Football is played almost everywhere in the world. Two teams of eleven players try to kick the ball into the other side's goal, and only the goalkeeper may use his or her hands. A match lasts ninety minutes, split into two halves of forty-five. The rules are simple enough for a child to learn in an afternoon, which is one reason the game is so popular. All you need is a ball and a bit of open ground.`,

  `Running is the cheapest sport there is. A pair of comfortable shoes is enough to begin. Start slowly: walk for a minute, run for a minute, and repeat that for twenty minutes, three times a week. After a month you will be able to run for much longer without stopping. Do not worry about speed at first. The most important thing is to enjoy it and to keep going.`,

  `Good health depends on a few simple habits. Sleep seven or eight hours a night, eat plenty of vegetables and fruit, move your body every day, and spend time with people you care about. Drink water instead of sugary drinks. Take breaks from your screen. None of this is new advice, but it is surprising how much better you feel when you actually follow it.`,

  `If you catch a cold, rest and drink warm liquids. Most colds go away on their own within a week. See a doctor if you have a high fever that lasts more than a few days, if you find it hard to breathe, or if you simply feel much worse than you would expect. It is always better to ask than to wait and hope.`,

  `Managing money is a skill that school rarely teaches. Write down what you earn and what you spend for one month, and you may be surprised where it goes. Coffee, subscriptions and takeaway meals add up quickly. Try to save a fixed part of your income as soon as you are paid, before you have a chance to spend it. Keep an emergency fund for unexpected bills, like a broken boiler or a car repair.`,

  `The shop on the corner sells a bit of everything: milk, eggs, newspapers, batteries, birthday cards, light bulbs and sweets. It is open from seven in the morning until eleven at night, every day of the year except Christmas. The owner knows most of his customers by name and always asks after their children. Prices are a little higher than at the supermarket, but nobody seems to mind.`,

  `School days are remembered for the strangest details. The squeak of chalk on a blackboard, the smell of the dinner hall, the rush of the corridors between lessons, a teacher who made history feel like a story. Homework seemed endless at the time. Years later, most people forget the dates and formulas, but they remember the friends they made and the teachers who believed in them.`,

  `Learning a new language takes time and practice. Read simple books, listen to songs and podcasts, watch films with subtitles, and speak as often as you can, even when you make mistakes. Mistakes are how you learn. Ten minutes every day is far more useful than two hours once a week. After a few months, you will notice that you understand much more than you can say, and that is perfectly normal.`,

  `At work, clear communication saves a lot of trouble. Write short emails with a clear subject line. Say what you need, by when, and why. In meetings, agree on who will do what before everyone leaves the room, and write it down. If a project is going to be late, tell people early rather than hoping the problem will fix itself. Most managers prefer bad news early to surprises late.`,

  `Working from home has advantages and disadvantages. There is no commute, the coffee is better and you can wear whatever you like. On the other hand, it can be lonely, and the line between work and the rest of life becomes blurred. Set up a quiet corner with a proper chair and a desk, keep regular hours, and go outside for a walk at lunchtime. Close the laptop at the end of the day.`,

  `Families come in all shapes and sizes. Some are large and noisy, with grandparents, aunts, uncles and cousins gathering every Sunday for lunch. Others are small and quiet. What matters is not the size but the care people show for each other: a phone call on a bad day, help with moving house, a seat at the table on a holiday. These small acts hold a family together.`,

  `My grandmother kept a notebook of recipes that she had collected over sixty years. Some were written in pencil, some in blue ink, and a few were just cut out of magazines and glued in. There were notes in the margins: too much sugar, better with lemon, Tom loved this one. When we cook from it now, it feels as if she is still in the kitchen with us.`,

  `Cities are changing the way people move. More streets have bicycle lanes, buses run on electricity, and trams are coming back to towns that removed them decades ago. Walking is often the fastest way to get around the centre. Cars are still useful for long distances and heavy shopping, but many young people no longer see the need to own one.`,

  `The car would not start on Monday morning. The engine turned over slowly, coughed once and went silent. It was the battery, of course, after a cold weekend. A neighbour lent us jump leads, and within ten minutes we were on the road. The lesson was simple: replace the battery before winter, not after it fails on the coldest day of the year.`,

  `Computers have become part of almost every job. Even farmers use software to plan their planting and track the weather. Yet many people feel uneasy with technology, worried that they might break something or lose their files. The best advice is to make regular backups, keep your software updated, use a different password for every important account, and be careful with links in unexpected messages.`,

  `A phone is a remarkable tool. It is a camera, a map, a music player, a bank, a library and a way to talk to anyone in the world. It can also take over your attention if you let it. Turn off the notifications you do not need, keep the phone out of the bedroom at night, and try leaving it at home when you go for a walk. You might enjoy the silence.`,

  `Music can change the mood of a room in seconds. A slow piano piece makes people quiet and thoughtful; a fast song with a strong beat gets them dancing. Learning an instrument takes years, but even a beginner can enjoy playing a few simple chords on a guitar. Practise a little every day, play with other people when you can, and do not be afraid to sound bad at first. Everyone does.`,

  `Reading is a way of living many lives. A good novel lets you walk the streets of a city you have never visited, in a century you will never see, inside the head of someone completely different from you. Libraries are free and full of treasures. Ask the librarian for a recommendation; they love to help. Keep a book by your bed and read a few pages before you sleep.`,

  `The library in our town is over a hundred years old. It has high windows, wooden shelves that reach the ceiling, and a reading room where the only sounds are the turning of pages and the ticking of an old clock. On Saturday mornings there is a story hour for children, and on Tuesday evenings a group of retired teachers meets to discuss a book they have all read.`,

  `Fixing things at home saves money and builds confidence. A dripping tap usually needs a new washer. A door that sticks may only need its hinges tightened. Before you start any job, turn off the water or the electricity, read the instructions, and make sure you have the right tools. If you are not sure what you are doing, especially with gas or wiring, call a professional.`,

  `Painting a room is easier than most people think. Move the furniture into the middle and cover it with old sheets. Fill any holes in the walls, sand them smooth and wipe away the dust. Use masking tape along the edges of the windows and the skirting boards. Paint the ceiling first, then the walls, with two thin coats rather than one thick one. Open the windows while the paint dries.`,

  `Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on high mountains, because the air pressure is lower. That is why pasta takes longer to cook in the Alps. Ice floats because water expands when it freezes, which is unusual; most substances become denser as they turn solid. If ice sank, lakes would freeze from the bottom up and fish could not survive the winter.`,

  `The moon has no light of its own. It reflects the light of the sun, and the shape we see depends on how much of its sunlit side faces the earth. A full cycle of phases takes about twenty-nine and a half days. The same side of the moon always faces us, because it turns once on its axis in exactly the time it takes to go around the earth.`,

  `Plants make their food from sunlight, water and carbon dioxide. The process takes place in the green parts of the leaves and releases oxygen into the air. Without plants there would be almost nothing to eat and very little to breathe. Even a small houseplant on a windowsill is doing this quiet work every day, as long as someone remembers to water it.`,

  `Long ago, before clocks were common, people told the time by the sun, by the bells of the church, or by the routine of the day: milking at dawn, dinner at noon, lamps lit at dusk. Trains changed that. Railway companies needed timetables that made sense from one town to the next, so local times were replaced by standard time across whole countries.`,

  `Markets have been held in the same square for centuries. Farmers bring cheese, honey, eggs and vegetables; a fishmonger shouts the prices of the morning catch; a woman sells flowers from buckets of water. The best time to go is early, before the crowds, or just before closing, when the traders are keen to sell what is left and prices fall.`,

  `A friend of mine decided to walk across the country last summer. She carried a small tent, a stove and a map, and walked about twenty-five kilometres a day. Some days it rained without stopping; other days were so hot she rested under trees in the afternoon. She said the hardest part was the first week, and the best part was the kindness of strangers who offered her water, directions and sometimes a bed.`,

  `Volunteering is a good way to meet people and to feel useful. Food banks need help sorting donations, animal shelters need dog walkers, and schools often look for adults who can listen to children read. Even an hour a week makes a difference. Many volunteers say they get back far more than they give.`,

  `Birthdays at our house follow the same pattern every year. There is a cake with too many candles, a song sung slightly out of tune, and a pile of presents wrapped in paper that the dog immediately tries to eat. Someone always forgets to buy matches. Someone else always tells the story of the year the cake fell on the floor. We laugh at it every single time.`,

  `Sleep is often the first thing people give up when they are busy, and it is almost always a mistake. A tired brain makes poor decisions, forgets things and loses its temper easily. Go to bed at the same time each night, keep the bedroom dark and cool, and avoid coffee in the late afternoon. If you cannot sleep, get up, read something dull under a dim light, and try again later.`,

  `Recycling works best when it is simple. Rinse bottles and tins, flatten cardboard boxes, and keep paper dry. Glass goes in one bin, plastic in another, and food waste can become compost for the garden. Better still, buy less packaging in the first place: take your own bags to the shop, carry a water bottle, and repair things before you replace them.`,

  `The hospital was busy but calm. Nurses moved quickly between the beds, checking charts and answering questions with patience. A porter pushed a wheelchair down the corridor, whistling softly. In the waiting room, a young father held a sleeping baby and stared at the clock. Everyone there was waiting for something: a test result, a doctor, a visitor, or simply the chance to go home.`,

  `Good neighbours make a street feel safe. They take in parcels when you are out, water your plants when you are away, and notice if something is wrong. A wave across the road, a short chat over the fence, an invitation for a cup of tea: these small gestures build trust slowly, year after year. When a storm knocks out the power, that trust matters more than anything.`,
  `The post office in the village closed last year, and people still talk about it. For decades it was more than a place to buy stamps: pensioners collected their money there, parents posted parcels to children at university, and the woman behind the counter knew everyone's news. Now the nearest branch is twelve miles away, and a van visits twice a week for two hours. It is not the same, but it is better than nothing.`,

  `Camping teaches you how much you can live without. A tent, a sleeping bag, a small stove, a torch and a few tins of food are enough for a weekend. Choose a flat spot away from the river, put the tent up before dark, and keep your food sealed so that animals are not tempted. At night, switch off the torch and look up. Far from the city lights, the sky is crowded with stars.`,

  `Tea means different things in different countries. In some places it is strong and served with milk and sugar; in others it is green, light and drunk without anything added. Some people boil it with spices, ginger and cardamom; others pour it over ice with lemon. Whatever the method, making tea for a guest is one of the oldest ways of saying welcome.`,

  `The first day at a new job is always strange. You do not know where the toilets are, whose mug is whose, or which printer actually works. Everyone seems to speak in abbreviations. Ask questions, write down names, and accept every offer of a coffee; it is the quickest way to learn how things really work. By the end of the second week, you will be the one explaining the printer to somebody else.`,

  `Board games have made a comeback. On winter evenings, friends gather around the kitchen table to build railways, trade sheep for bricks, or solve a murder in a country house. The best games are easy to learn and hard to master. Arguments about the rules are part of the fun, although it helps if someone has actually read them before the game begins.`,

  `Elderly people often say that the years pass faster as you get older. A summer holiday felt endless at the age of eight; at sixty, a whole year disappears in what seems like a few months. One explanation is that new experiences make time feel longer, because the brain records more detail. So if you want a longer life, at least in memory, keep doing new things.`,

  `A good cup of coffee starts with fresh beans. Grind them just before brewing, use water that is hot but not boiling, and do not leave the coffee sitting on a hot plate for an hour. Everyone has their own preference: some like it black and strong, others with plenty of milk and foam. There is no right answer, only the coffee you enjoy drinking.`,

  `Rivers shaped the places where people chose to live. They brought water for drinking and farming, fish for food, and a road for boats long before there were proper roads on land. Many of the world's great cities grew up at a bridge or a ford, where travellers could cross. Today the rivers are cleaner than they were fifty years ago, and otters and salmon have returned to some of them.`,

  `Being a good listener is rarer than being a good speaker. It means putting your phone down, looking at the person, and letting them finish their sentence without planning your answer. Ask a question that shows you were paying attention. People remember how you made them feel long after they forget what you said.`,

  `The bicycle is one of the most efficient machines ever built. With the same effort it takes to walk a mile, a cyclist can travel three or four. Check the tyres before a ride, keep the chain oiled, and make sure the brakes work. Wear bright clothes and use lights after dark. A bell is useful too, mostly for warning people who are looking at their phones.`,

  `Saturday mornings at the swimming pool are noisy and cheerful. Children splash in the shallow end while their parents sit on plastic chairs and drink coffee from paper cups. In the fast lane, serious swimmers count their lengths and check their watches. A lifeguard sits on a tall chair and blows a whistle at anyone who runs along the edge.`,

  `Writing a letter by hand has become unusual, and that is exactly why it means so much. A letter takes time, and the person who receives it knows that. Choose good paper, write slowly, and do not worry about small mistakes; they show that a real person wrote it. Keep it simple: say how you are, ask how they are, and share one small story from your week.`,

  `Mountains demand respect. The weather can change in minutes, and a path that was easy in sunshine becomes dangerous in fog or snow. Tell someone your route, carry a map, water, food, a warm layer and a waterproof jacket, and turn back if you are not sure. The summit will still be there next year.`,

  `The kitchen is the heart of most homes. It is where people gather during a party even when there is a perfectly good living room next door. Homework gets done on the kitchen table, arguments are settled over the washing up, and news is shared while the kettle boils. A house can have beautiful rooms, but the kitchen is where life happens.`,

  `Insects are more important than most people realise. Bees and butterflies pollinate flowers and crops; beetles and worms break down dead leaves and return nutrients to the soil; ladybirds eat the aphids that damage roses. Leaving a corner of the garden a little wild, with long grass, nettles and a pile of old logs, gives them somewhere to live.`,

  `Moving house is said to be one of the most stressful events in life. Start packing early, one room at a time, and label every box with its contents and the room it belongs in. Keep a bag with the essentials for the first night: kettle, mugs, tea, toilet paper, phone chargers, a towel and a change of clothes. The rest can wait until tomorrow.`,

  `Electric cars are becoming common on our roads. They are quiet, cheap to run and produce no exhaust fumes in the street. Their batteries take longer to charge than a tank takes to fill, so drivers plan long journeys around charging stations and often charge at home overnight. As batteries improve, the range of each car keeps growing.`,

  `Children ask the best questions. Why is the sea salty? Where does the wind come from? Why do we have to sleep? Do fish get thirsty? Adults are often embarrassed to admit that they do not know the answers. The honest reply, "I am not sure, let's find out together", is usually the most useful one, and it teaches something more important than any single fact.`,
];

const dialogue = `"Are you coming to the party on Friday?" asked Sarah.
"I'm not sure," said James. "I've got a lot of work to finish, and I promised Mum I'd visit on Saturday."
"Oh, come on! It won't be the same without you. Besides, you said that last time."
"Fine, fine. I'll come for an hour or two. But I'm not dancing."
"We'll see about that," she laughed.

"Excuse me, do you know where the station is?"
"Yes, it's not far. Go straight on, turn left at the traffic lights, and it's on your right, next to the bank."
"Thank you so much!"
"You're welcome. Have a nice day."

"What time does the shop close?" - "Half past eight, I think; maybe nine on Thursdays."
"Didn't you say you'd call?" "I did, didn't I... Sorry! It's been a crazy week."
"Who's there?" "It's me - open the door, it's freezing out here!"`;

const numbers = `Shopping list: 2 litres of milk, 12 eggs, 500 g of flour, 1.5 kg of potatoes, 3 lemons, 250 ml of cream.
Total: $47.85 (including 8% tax). Change from $50.00: $2.15.
The meeting is on 14/03/2025 at 10:30; the next one is 2025-04-11T09:00:00Z.
Call us on +44 20 7946 0000 or (555) 123-4567, ext. 89.
In 2023 the town had 48,215 residents; by 2030 it is expected to reach about 52,000 (+7.8%).
Recipe for 4 people: 400g pasta, 2 tbsp olive oil, 1/2 tsp salt, 3-4 cloves of garlic.
Speed limit: 30 mph (48 km/h) in town, 70 mph on the motorway.
Temperatures this week: Mon 12°C, Tue 14°C, Wed 9°C, Thu -2°C, Fri 0°C.
3 + 4 = 7; 12 * 12 = 144; 100 / 8 = 12.5; 2^10 = 1024; sqrt(81) = 9; 7 % 3 = 1.
Pi is roughly 3.14159, e is about 2.71828, and the golden ratio is 1.61803.
Flight BA 0117 departs at 08:45 from Terminal 5, gate B32; seat 23A.
Order #100245 shipped on 1 June; tracking code: ZX-9981-4410-77.
Version 1.2.3 fixed 17 bugs; version 2.0.0-beta.1 broke 3 of them again.
1. Preheat the oven to 180 degrees.  2. Grease the tin.  3. Bake for 35-40 minutes.
Room 204, 2nd floor; Room 315, 3rd floor; Room 1101, 11th floor.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 60 70 80 90 100 1000 1000000`;

const punctuation = `Wait... what? No! Really?! That's impossible -- or is it?
Note: bring (a) a pen, (b) paper, and (c) your ID; don't forget!
She said: 'It's fine.' He replied: "Is it, though?"
Items: apples, pears, plums; colours: red/green/blue; sizes: S, M, L, XL.
email: hello@example.com | web: https://www.example.org/path?query=1&sort=asc#top
#hashtag @mention *bold* _italic_ ~strike~ [link](url) <tag> {braces} \\backslash
Prices rose 5% -> 10% -> 15%; costs: ~$1,200 (approx.) & more...
"Quotes", 'apostrophes', brackets [like this], and {like that}; semicolons; colons: dashes - and -- and ---.
!!! ??? ... ,,, ;;; ::: --- +++ === ### *** /// ||| &&& %%%
a.b.c, x_y_z, CamelCaseWords, snake_case_words, kebab-case-words, SCREAMING_CASE, dot.separated.names`;

const code: string[] = [
  String.raw`function add(a: number, b: number): number {
  return a + b;
}

export async function fetchUser(id: string): Promise<User | null> {
  const response = await fetch('/api/users/' + id);
  if (!response.ok) {
    return null;
  }
  const data = await response.json();
  return { id: data.id, name: data.name, email: data.email };
}

const items = [1, 2, 3, 4, 5].map((x) => x * 2).filter((x) => x > 4);
console.log(items.length, items.join(', '));
for (let i = 0; i < items.length; i++) {
  if (items[i] % 3 === 0) continue;
  total += items[i];
}`,

  String.raw`def fibonacci(n):
    """Return the first n Fibonacci numbers."""
    result = []
    a, b = 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


if __name__ == "__main__":
    print(fibonacci(10))
    with open("data.txt", "r", encoding="utf-8") as f:
        for line in f:
            print(line.strip())`,

  String.raw`{
  "name": "example",
  "version": "1.0.0",
  "enabled": true,
  "count": 42,
  "ratio": 0.75,
  "tags": ["alpha", "beta", "gamma"],
  "owner": { "id": 7, "email": "owner@example.com" },
  "notes": null
}`,

  String.raw`#!/bin/sh
set -eu
cd "$(dirname "$0")/.."
for f in src/*.ts; do
  echo "checking $f"
  grep -n "TODO" "$f" || true
done
ls -la /tmp | head -n 20
export PATH="$HOME/.local/bin:$PATH"`,

  String.raw`SELECT id, name, created_at
FROM users
WHERE active = 1 AND created_at >= '2024-01-01'
ORDER BY created_at DESC
LIMIT 10;

INSERT INTO orders (user_id, total) VALUES (12, 99.50);
UPDATE orders SET status = 'shipped' WHERE id = 1001;`,

  String.raw`<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Hello</title>
  <link rel="stylesheet" href="style.css">
</head>
<body>
  <h1 class="title">Welcome</h1>
  <p>This is a <a href="/about">simple page</a>.</p>
  <ul><li>One</li><li>Two</li><li>Three</li></ul>
</body>
</html>`,

  String.raw`#include <stdio.h>

int main(int argc, char **argv) {
    int sum = 0;
    for (int i = 1; i <= 10; ++i) {
        sum += i;
    }
    printf("sum = %d\n", sum);
    return 0;
}`,

  String.raw`fn main() {
    let words = vec!["apple", "banana", "cherry"];
    for (i, w) in words.iter().enumerate() {
        println!("{}: {}", i, w);
    }
    let total: u32 = (1..=10).sum();
    assert_eq!(total, 55);
}`,
];

const otherScripts = `中文：今天天气很好，我们去公园散步吧。他喜欢喝茶，也喜欢读书。这家饭店的菜很好吃。
日本語：今日はいい天気ですね。駅まで歩いて十分ぐらいです。ありがとうございます。
한국어: 안녕하세요. 오늘 날씨가 정말 좋네요. 커피 한 잔 하실래요?
Русский: Доброе утро! Сегодня хорошая погода. Я люблю читать книги и гулять в парке.
Ελληνικά: Καλημέρα! Ο καιρός είναι ωραίος σήμερα. Ευχαριστώ πολύ.
العربية: صباح الخير. الطقس جميل اليوم. شكرا جزيلا.
עברית: בוקר טוב. מזג האוויר נעים היום.
हिन्दी: नमस्ते! आज मौसम बहुत अच्छा है। धन्यवाद।
ไทย: สวัสดีครับ วันนี้อากาศดีมาก
Français : Bonjour ! Il fait beau aujourd'hui ; on va au marché ? Très bien, à demain.
Deutsch: Guten Morgen! Schöne Grüße aus München. Die Straße ist nass, aber das Wetter wird besser.
Español: ¡Hola! ¿Qué tal? Mañana vamos a la playa con los niños.
Português: Olá! Não sei se vou conseguir chegar às três horas.
Polski: Dzień dobry! Jak się masz? Zażółć gęślą jaźń.
Türkçe: Günaydın! Bugün hava çok güzel.
Tiếng Việt: Xin chào! Hôm nay trời đẹp quá.
Emoji: 😀 😂 ❤️ 👍 🎉 🌍 ☕ 🍕 🐶 🐱 👋🏽 👨‍👩‍👧‍👦 🇬🇧 🇯🇵`;

const faq = `Q: How do I reset my password?
A: Open the settings page, choose "Account", then "Reset password", and follow the link we send to your email address.

Q: Can I change my delivery address after ordering?
A: Yes, as long as the order has not been shipped. Go to "My orders", select the order and click "Edit address".

Q: What should I do if my parcel arrives damaged?
A: Take a photo of the box and the item, and contact our support team within 14 days. We will send a replacement or refund you in full.

Q: Is there a student discount?
A: Students get 10% off most items. You will need to confirm your student status once a year.

User: Can you help me write a short note to thank my neighbour for watering the plants?
Assistant: Of course! Here is a simple note: "Dear Ann, thank you so much for looking after the plants while we were away. They look happier than when we left! Please let us know if we can ever return the favour. Best wishes, Tom and Lucy."

User: What is the capital of France?
Assistant: The capital of France is Paris.

User: Explain why the sky is blue in one sentence.
Assistant: Sunlight is scattered by the molecules in the air, and blue light is scattered much more than red light, so the sky looks blue from every direction.`;

/** The built-in BPE training corpus (original text, ~31 KB). */
export const BPE_CORPUS: string = [
  prose.join('\n\n'),
  dialogue,
  numbers,
  punctuation,
  faq,
  code.join('\n\n'),
  otherScripts,
].join('\n\n');
